//! `kvloft topology` and `--check` as a new user meets them.

use kvloft_tests::{kvloft, TestServer};
use std::path::Path;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn generated_file_checks_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let out = kvloft(&["topology"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[[shard]]") && text.contains("# Machine:"), "{text}");
    let path = write(dir.path(), "t.toml", &text);
    let check = kvloft(&["topology", "--check", &path]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains(": ok,"));
    let server = TestServer::start(&["--config", &path]);
    let stats = server.client().unwrap().stats().unwrap();
    assert_eq!(stats.shards.len(), text.lines().filter(|l| *l == "[[shard]]").count());
    let (status, _) = server.stop("TERM");
    assert!(status.success());
}

/// Runs `--check` on `text`; returns stderr after asserting exit status 1.
fn check_fails(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "t.toml", text);
    let out = kvloft(&["topology", "--check", &path]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains(&format!("{path}:")), "names the file: {err}");
    assert!(err.contains("fix:"), "names the fix: {err}");
    err
}

#[test]
fn misspelt_key_is_named_with_its_line() {
    let err = check_fails("[memory]\npool-size = \"1GiB\"\nhugepage = true\n");
    assert!(err.contains("t.toml:3:1: error: hugepage: unknown field `hugepage`"), "{err}");
    assert!(err.contains("did you mean `hugepages`?"), "{err}");
}

#[test]
fn core_that_does_not_exist_is_named_with_its_line() {
    let err = check_fails("[[shard]]\ncore = 0\n\n[[shard]]\ncore = 4096\n");
    assert!(err.contains("t.toml:5:8: error: shard[1].core: no CPU 4096 on this machine"), "{err}");
    assert!(err.contains("fix: use one of the online CPUs"), "{err}");
}

#[test]
fn duplicate_core_is_named_with_both_lines() {
    let err = check_fails("[[shard]]\ncore = 0\n[[shard]]\ncore = 0\n");
    assert!(err.contains("t.toml:4:8: error: shard[1].core: CPU 0 already runs shard[0] (line 2)"), "{err}");
}

#[test]
fn serve_refuses_an_invalid_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.toml", "[server]\nsocket = 3\n");
    let out = kvloft(&["serve", "--config", &path]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:10: error") && err.contains("invalid type"), "{err}");
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = kvloft(&["topology", "--check", "/nonexistent/kvloft.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the topology file"));
}

#[test]
fn calibrate_measures_the_gpu_only_where_there_is_one() {
    let tiny = ["bench", "calibrate", "--block-bytes", "4K", "--batch-bytes", "1MiB", "--repetitions", "1"];
    let auto = kvloft(&tiny);
    assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    let section = String::from_utf8_lossy(&auto.stdout).to_string();
    let stderr = String::from_utf8_lossy(&auto.stderr).to_string();
    if !stderr.contains("no CUDA driver here") {
        return; // a GPU machine: its curves are checked by the device runs (bench/results)
    }
    assert!(section.contains("method = \"memcpy\"") && !section.contains("cuda_"), "{section}");
    // Insisting on the GPU without a driver fails, saying why.
    let on = kvloft(&[&tiny[..], &["--gpu", "on"]].concat());
    assert!(!on.status.success());
    let err = String::from_utf8_lossy(&on.stderr);
    assert!(err.contains("measuring GPU 0") && err.contains("CUDA driver"), "{err}");
}
