//! `--plot FILE`: charts of a sweep as SVG and PNG.

use kvloft_bench::plot::{self, PlotError};
use kvloft_bench::report::{Case, Report};
use kvloft_bench::ssd;

/// An ssd-shaped report: two modes, two operations, three block sizes, four queue depths.
fn ssd_report() -> Report {
    let mut r = Report::new("ssd");
    for mode in ["direct", "buffered"] {
        for op in ["write", "read"] {
            for bs in [4096u64, 65_536, 1 << 20] {
                for qd in [1u64, 2, 4, 8] {
                    let iops = 5000.0 * (qd as f64).sqrt() * if bs == 1 << 20 { 0.2 } else { 1.0 };
                    let mut c = Case {
                        name: format!("{op}_{mode}_qd{qd}_{bs}"),
                        samples: 100,
                        iops: Some(iops),
                        gbps: Some(iops * bs as f64 / 1e9),
                        p50_us: Some(100.0 * qd as f64),
                        p99_us: Some(300.0 * qd as f64),
                        ..Case::default()
                    };
                    for (k, v) in
                        [("op", op.into()), ("mode", mode.into()), ("qd", qd.into()), ("block_bytes", bs.into())]
                    {
                        c.params.insert(k.into(), v);
                    }
                    c.params.insert("file_bytes".into(), (1u64 << 30).into());
                    c.params.insert("path".into(), "/tmp/x.dat".into());
                    r.cases.push(c);
                }
            }
        }
    }
    r
}

#[test]
fn ssd_sweeps_plot_as_svg_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let report = ssd_report();
    let spec = ssd::plot_spec(&report);

    let svg = dir.path().join("sweep.svg");
    plot::plot(&report, &spec, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    for label in ["read · direct", "write · buffered", "4 KiB", "1 MiB", "queue depth", "GB/s", "IOPS"] {
        assert!(text.contains(label), "the SVG lacks {label:?}");
    }

    let png = dir.path().join("SWEEP.PNG");
    plot::plot(&report, &spec, &png).unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // 4 panels of 500 px side by side.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 2000);
}

#[test]
fn socket_results_plot_latency_per_batch_size() {
    let mut r = Report::new("socket");
    for n in [1u64, 64, 1024] {
        let mut c = Case { name: format!("lookup_{n}"), samples: 10, ..Case::default() };
        c.p50_us = Some(20.0 + n as f64 / 10.0);
        c.p99_us = Some(40.0 + n as f64 / 5.0);
        c.params.insert("hashes".into(), n.into());
        c.params.insert("shards".into(), 2.into());
        r.cases.push(c);
    }
    // A case without the x parameter is left out, not an error.
    r.cases.push(Case { name: "lookup_throughput".into(), ops_per_s: Some(1e6), ..Case::default() });
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("socket.svg");
    plot::plot(&r, &plot::socket_spec(&r), &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("p50") && text.contains("p99") && text.contains("1024"));
}

#[test]
fn unknown_formats_and_empty_sweeps_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let report = ssd_report();
    let spec = ssd::plot_spec(&report);
    let e = plot::plot(&report, &spec, &dir.path().join("x.jpg")).unwrap_err();
    assert!(matches!(e, PlotError::Format(_)), "{e}");
    let empty = Report::new("ssd");
    let e = plot::plot(&empty, &spec, &dir.path().join("x.svg")).unwrap_err();
    assert!(matches!(e, PlotError::NoData(_)), "{e}");
}
