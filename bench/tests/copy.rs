//! The `d2h`/`h2d` suites and `calibrate` on tiny sizes: the direct path and the server path (a
//! server started in this process) produce verified cases with sane figures, and calibration
//! writes a topology file that checks.

use kvloft_bench::calibrate::{self, CalibrateOptions};
use kvloft_bench::copy::{self, CopyOptions};
use kvloft_bench::report::Case;
use kvloft_bench::server::ServerMode;
use kvloft_topology::model::{CopyDirection, CopyMethod};
use kvloft_topology::validate;

fn tiny(direction: CopyDirection, server: ServerMode) -> CopyOptions {
    let mut o = CopyOptions::new(direction, server);
    o.block_bytes = vec![4096];
    o.layers = vec![2];
    o.batches = vec![8, 32];
    o.repetitions = Some(3);
    o.warmup = 1;
    o
}

fn param<'a>(c: &'a Case, key: &str) -> &'a serde_json::Value {
    c.params.get(key).unwrap_or_else(|| panic!("{}: no param {key}", c.name))
}

fn check_run(direction: CopyDirection, server: ServerMode, paths: &[&str]) {
    let run = copy::run(&tiny(direction, server)).unwrap();
    let suite = direction.as_str();
    assert_eq!(run.report.suite, suite);
    assert!(run.notes[0].contains("measuring the host backend"), "{:?}", run.notes);
    for batch in [8usize, 32] {
        for path in paths {
            let name = format!("{suite}_{path}_4k_l2_b{batch}");
            let c = run.report.cases.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no case {name}"));
            assert_eq!(param(c, "backend"), "host");
            assert_eq!(param(c, "direction"), suite);
            assert_eq!(param(c, "batch").as_u64(), Some(batch as u64));
            assert_eq!(param(c, "slice_bytes").as_u64(), Some(2 * 2 * 4096));
            assert_eq!(c.samples, 3, "{name}");
            let gbps = c.gbps.unwrap();
            assert!(gbps > 0.0, "{name}: {gbps}");
            assert!(c.p50_us.unwrap() > 0.0 && c.p99_us.unwrap() >= c.p50_us.unwrap(), "{name}");
            if path.starts_with("ceiling") {
                assert!(c.ratio.is_none());
                continue;
            }
            let ratio = c.ratio.unwrap();
            // Only sane, not bounded above: with 3 samples on a busy machine the ceiling's own
            // timing can dip far below the path's (a timed bound here would be flaky).
            assert!(ratio > 0.0 && ratio.is_finite(), "{name}: ratio {ratio}");
            assert!((ratio - gbps / c.ceiling_gbps.unwrap()).abs() < 1e-9);
            assert!(param(c, "memcpy_ratio").as_f64().unwrap() > 0.0);
            assert_eq!(param(c, "verified_blocks").as_u64(), Some(batch as u64), "{name}");
        }
    }
    let expected = paths.len() * 2;
    assert_eq!(run.report.cases.len(), expected, "{:?}", run.report.cases.iter().map(|c| &c.name).collect::<Vec<_>>());
}

#[test]
fn d2h_direct_and_server_paths_verify_and_measure() {
    check_run(CopyDirection::D2h, ServerMode::InProcess, &["direct", "server", "ceiling-process_vm", "ceiling-memcpy"]);
}

#[test]
fn h2d_direct_and_server_paths_verify_and_measure() {
    check_run(CopyDirection::H2d, ServerMode::InProcess, &["direct", "server", "ceiling-process_vm", "ceiling-memcpy"]);
    let run = copy::run(&tiny(CopyDirection::H2d, ServerMode::InProcess)).unwrap();
    let server = run.report.cases.iter().find(|c| c.name == "h2d_server_4k_l2_b8").unwrap();
    assert!(param(server, "lookup_p50_us").as_f64().unwrap() > 0.0);
    assert_eq!(param(server, "server"), "in-process");
}

#[test]
fn without_a_server_only_direct_and_ceilings_run() {
    check_run(CopyDirection::H2d, ServerMode::Off, &["direct", "ceiling-process_vm", "ceiling-memcpy"]);
}

#[test]
fn oversized_batches_are_skipped_with_a_note() {
    let mut o = tiny(CopyDirection::D2h, ServerMode::Off);
    o.max_batch_bytes = 8 * 2 * 2 * 4096;
    let run = copy::run(&o).unwrap();
    assert!(run.report.cases.iter().all(|c| c.name.ends_with("_b8")));
    assert!(run.notes.iter().any(|n| n.starts_with("skipped d2h_*_4k_l2_b32")), "{:?}", run.notes);
}

#[test]
fn calibration_writes_a_file_that_checks() {
    let opts = CalibrateOptions {
        block_bytes: vec![4096, 64 << 10],
        batch_bytes: 1 << 20,
        repetitions: 2,
        ..CalibrateOptions::default()
    };
    let cal = calibrate::run(&opts).unwrap();
    // Two methods, two directions, two sizes.
    assert_eq!(cal.points.len(), 8);
    assert!(cal.points.iter().all(|p| p.gbps > 0.0 && p.measured_at.is_some()));
    assert!(cal.points.iter().any(|p| p.method == CopyMethod::ProcessVm));
    assert_eq!(cal.report.cases.len(), 8);

    let dir = tempfile::tempdir().unwrap();
    // A new file: the machine's default topology plus the section.
    let fresh = dir.path().join("new.toml");
    calibrate::write_atomically(&fresh, &calibrate::rewritten(&fresh, &cal.points, &cal.machine).unwrap()).unwrap();
    let checked = validate::load(&fresh, &cal.machine).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(checked.topology.calibration, cal.points);

    // An existing file: everything but the section is kept, and rewriting again changes nothing.
    let user = dir.path().join("user.toml");
    let original = "# my topology\n[server]\nmetrics-addr = \"off\" # no metrics\n\n[memory]\npool-size = \"256MiB\"\n";
    std::fs::write(&user, original).unwrap();
    let once = calibrate::rewritten(&user, &cal.points, &cal.machine).unwrap();
    assert!(once.starts_with(original), "{once}");
    calibrate::write_atomically(&user, &once).unwrap();
    assert_eq!(calibrate::rewritten(&user, &cal.points, &cal.machine).unwrap(), once);
    let checked = validate::load(&user, &cal.machine).unwrap_or_else(|d| panic!("{d}"));
    assert_eq!(checked.topology.calibration, cal.points);
    assert_eq!(checked.topology.server.metrics_addr, None);

    // Measuring a subset again replaces those points and keeps the others.
    let mut again = cal.points.clone();
    again.retain(|p| p.block_bytes == 4096);
    again.iter_mut().for_each(|p| p.gbps += 1.0);
    let merged = calibrate::rewritten(&user, &again, &cal.machine).unwrap();
    assert!(merged.starts_with(original), "{merged}");
    calibrate::write_atomically(&user, &merged).unwrap();
    let read = validate::load(&user, &cal.machine).unwrap_or_else(|d| panic!("{d}")).topology.calibration;
    assert_eq!(read, calibrate::merge(&cal.points, &again));
    assert_eq!(read.len(), cal.points.len());
    assert!(read.iter().filter(|p| p.block_bytes == 4096).zip(&again).all(|(r, a)| r == a));

    // A file that does not check is left alone, with its diagnostics in the error.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[memory]\npool-size = \"100TiB\"\n").unwrap();
    let e = calibrate::rewritten(&bad, &cal.points, &cal.machine).unwrap_err().to_string();
    assert!(e.contains("memory.pool-size") && e.contains("kvloft topology --check"), "{e}");
    assert_eq!(std::fs::read_to_string(&bad).unwrap(), "[memory]\npool-size = \"100TiB\"\n");
}
