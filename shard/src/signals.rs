//! SIGINT and SIGTERM: the first asks every shard to stop cleanly, a second one exits at once.
//!
//! The two signals are blocked in the main thread before any other thread starts, so every
//! thread inherits the mask and no signal handler ever runs; one thread takes them with
//! `sigwait`. Handlers would be fragile here: a library that installed its own (GPU drivers do)
//! gets chained and may kill the process before the shards stop.

use crate::error::ServeError;
use crate::server::ShutdownHandle;

/// Exit status after a second signal (128 + SIGINT, as shells report it).
const FORCED_EXIT_STATUS: i32 = 130;

/// Proof that SIGINT and SIGTERM are blocked in this thread (and the threads it starts).
#[derive(Debug)]
pub struct BlockedSignals {
    set: libc::sigset_t,
}

/// Blocks SIGINT and SIGTERM in the calling thread. Call it first thing in `main`, before any
/// thread exists; threads started later inherit the mask.
pub fn block() -> Result<BlockedSignals, ServeError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the signal numbers are valid.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(ServeError::Signals(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(BlockedSignals { set })
}

/// Starts the thread that turns the first SIGINT or SIGTERM into `handle.shutdown()` and a second
/// into an immediate exit.
pub fn install(handle: ShutdownHandle, blocked: BlockedSignals) -> Result<(), ServeError> {
    std::thread::Builder::new()
        .name("kvloft-signals".into())
        .spawn(move || {
            let mut seen = 0;
            loop {
                let mut signal: libc::c_int = 0;
                // SAFETY: `blocked.set` is an initialised sigset_t and `signal` a valid out-pointer.
                if unsafe { libc::sigwait(&blocked.set, &mut signal) } != 0 {
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    eprintln!("kvloft: signal {signal} received, shutting down (send it again to exit at once)");
                    handle.shutdown();
                } else {
                    eprintln!("kvloft: second signal, exiting without cleanup");
                    std::process::exit(FORCED_EXIT_STATUS);
                }
            }
        })
        .map_err(ServeError::Signals)?;
    Ok(())
}
