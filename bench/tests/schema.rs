//! Result files validate against the documented schema (`docs/src/bench-schema.json`): a fresh
//! `ssd` report, a case with every figure set, and every JSON file under `bench/results/`.

use kvloft_bench::report::{Case, Report};
use kvloft_bench::ssd::{self, Mode, Op, SsdOptions};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the bench crate sits in the workspace").to_path_buf()
}

fn schema() -> Value {
    let path = repo().join("docs/src/bench-schema.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("the schema is JSON")
}

/// The schema's complaints about `doc`, one line each.
fn errors(doc: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(&schema()).expect("the schema compiles");
    validator.iter_errors(doc).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

fn assert_valid(doc: &Value, what: &str) {
    let errs = errors(doc);
    assert!(errs.is_empty(), "{what} does not match the schema:\n{}", errs.join("\n"));
}

#[test]
fn the_schema_is_a_valid_2020_12_schema() {
    let s = schema();
    assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
    assert!(jsonschema::meta::is_valid(&s));
}

#[test]
fn a_tiny_ssd_sweep_validates() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let opts = SsdOptions {
        path: Some(dir.path().to_path_buf()),
        file_size: Some(4 << 20),
        qds: vec![1, 4],
        block_sizes: vec![4 << 10, 64 << 10],
        modes: vec![Mode::Direct, Mode::Buffered],
        ops: vec![Op::Write, Op::Read],
        seconds_per_case: Duration::from_millis(30),
        warmup: Duration::from_millis(5),
        max_ops_per_case: Some(200),
        progress: false,
        ..SsdOptions::default()
    };
    let report = ssd::run(&opts).expect("the ssd suite runs on a temporary file");
    assert_eq!(report.suite, "ssd");
    assert_eq!(report.cases.len(), 16);
    let mut names: Vec<&str> = report.cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 16, "case names are unique");
    for c in &report.cases {
        assert!(c.samples > 0 && c.samples <= 200, "{}: {} samples", c.name, c.samples);
        assert!(c.iops.unwrap() > 0.0 && c.gbps.unwrap() > 0.0, "{}", c.name);
        assert!(c.p50_us.unwrap() > 0.0 && c.p50_us <= c.p99_us && c.p99_us <= c.max_us, "{}", c.name);
        assert_eq!(c.params["file_bytes"], 4 << 20);
    }
    assert!(report.cases.iter().any(|c| c.name == "read_buffered_qd4_64k"));
    // The test file the suite made is gone.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let doc = serde_json::to_value(&report).unwrap();
    assert_valid(&doc, "a fresh ssd report");

    // And the schema holds ssd cases to their parameters.
    let mut broken = doc.clone();
    broken["cases"][0]["params"].as_object_mut().unwrap().remove("qd");
    assert!(!errors(&broken).is_empty(), "an ssd case without `qd` passes");
    let mut broken = doc;
    broken["cases"][0].as_object_mut().unwrap().remove("gbps");
    assert!(!errors(&broken).is_empty(), "an ssd case without `gbps` passes");
}

#[test]
fn every_case_field_is_in_the_schema() {
    let mut report = Report::new("example");
    let mut case = Case { name: "all".into(), samples: 3, ..Case::default() };
    case.params.insert("x".into(), 1.into());
    case.p50_us = Some(1.0);
    case.p90_us = Some(2.0);
    case.p99_us = Some(3.0);
    case.max_us = Some(4.0);
    case.ops_per_s = Some(5.0);
    case.gbps = Some(6.0);
    case.iops = Some(7.0);
    case.ceiling_gbps = Some(8.0);
    case.ratio = Some(0.75);
    report.cases.push(case);
    let doc = serde_json::to_value(&report).unwrap();
    assert_valid(&doc, "a report with every field set");

    let mut broken = doc.clone();
    broken.as_object_mut().unwrap().remove("cases");
    assert!(!errors(&broken).is_empty(), "a report without cases passes");
    let mut broken = doc;
    broken["started_at"] = "yesterday".into();
    assert!(!errors(&broken).is_empty(), "a malformed start time passes");
}

#[test]
fn committed_results_validate() {
    let dir = repo().join("bench/results");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_valid(&doc, &path.display().to_string());
            checked += 1;
        }
    }
    assert!(checked > 0, "no result files under {}", dir.display());
}
