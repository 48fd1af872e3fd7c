//! Helpers for kvloft's integration tests: find the `kvloft` binary, run it as a real server on a
//! private socket, stop it with a signal and check how it exited.
#![deny(unsafe_code)]

use kvloft_shard::client::Client;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to accept its first client.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `kvloft` binary: `$KVLOFT_BIN`, else `kvloft` in the target directory this test was built
/// into (`cargo test --workspace` builds it before running any test).
pub fn kvloft_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KVLOFT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/kvloft
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("kvloft")).expect("target directory");
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p kvloft-cli` first", bin.display());
    bin
}

/// Runs `kvloft ARGS` to completion.
pub fn kvloft(args: &[&str]) -> Output {
    Command::new(kvloft_bin()).args(args).output().expect("run kvloft")
}

/// A server process on a socket in its own temporary directory; killed if the test panics.
#[derive(Debug)]
pub struct TestServer {
    /// The process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts `kvloft serve --socket <tmp> --metrics-addr off --pool-size 64MiB EXTRA...` and
    /// waits until a client can say hello.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new().prefix("kvloft-test").tempdir_in("/tmp").expect("tempdir");
        let socket = dir.path().join("kvloft.sock");
        let mut args = vec!["serve", "--socket", socket.to_str().expect("utf-8 path")];
        if !extra.contains(&"--metrics-addr") {
            args.extend(["--metrics-addr", "off"]);
        }
        if !extra.contains(&"--pool-size") {
            args.extend(["--pool-size", "64MiB"]);
        }
        args.extend_from_slice(extra);
        let child = Command::new(kvloft_bin())
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kvloft serve");
        let mut server = Self { child, socket, _dir: dir };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll server") {
                panic!("server exited during start with {status}: {}", self.stderr());
            }
            if self.socket.exists() && self.client().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server did not accept a client within {START_TIMEOUT:?}");
    }

    /// A new client of this server.
    pub fn client(&self) -> Result<Client, kvloft_shard::client::ClientError> {
        Client::connect(&self.socket, "kvloft-tests", Duration::from_secs(5))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`"TERM"`, `"INT"`) and waits up to 10 s for the process to exit.
    pub fn stop(mut self, signal: &str) -> (ExitStatus, String) {
        let sent = Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -{signal} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll server") {
                let stderr = self.stderr();
                return (status, stderr);
            }
            assert!(Instant::now() < deadline, "server did not exit within 10 s of SIG{signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(thread name, Cpus_allowed_list)` of every thread of process `pid`, from `/proc`.
pub fn thread_affinities(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/<pid>/task").flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let allowed =
            status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or_default().trim().to_string();
        out.push((comm, allowed));
    }
    out
}
