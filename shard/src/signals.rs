//! SIGINT and SIGTERM: the first asks every shard to stop cleanly, a second one exits at once.

use crate::error::ServeError;
use crate::server::ShutdownHandle;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// Exit status after a second signal (128 + SIGINT, as shells report it).
const FORCED_EXIT_STATUS: i32 = 130;

/// Starts a thread that turns the first SIGINT or SIGTERM into `handle.shutdown()` and a second
/// into an immediate exit.
pub fn install(handle: ShutdownHandle) -> Result<(), ServeError> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(ServeError::Signals)?;
    std::thread::Builder::new()
        .name("kvloft-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
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
