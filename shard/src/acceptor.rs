//! The thread that accepts client connections.
//!
//! Accepting is not on the hot path, and doing it on a plain thread with the standard library's
//! listener gives us the descriptor, so the kernel's credentials of the peer (`SO_PEERCRED`) can
//! be read: the host backend copies to and from the *peer's* memory, so its pid must come from
//! the kernel, never from the client's own word. Each connection is then handed, round-robin, to
//! a shard through a bounded channel and served there for its whole life.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections waiting for their shard to pick them up, per shard.
pub const PENDING_CONNECTIONS_PER_SHARD: usize = 64;

/// Who is on the other end of a connection, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id.
    pub pid: i32,
    /// User id.
    pub uid: u32,
}

/// An accepted connection on its way to a shard.
#[derive(Debug)]
pub struct NewConnection {
    /// The connected socket, non-blocking.
    pub fd: OwnedFd,
    /// Its peer.
    pub peer: Peer,
}

/// Reads the peer's credentials of a connected Unix socket.
pub fn peer_of(fd: &impl AsRawFd) -> std::io::Result<Peer> {
    // SAFETY: ucred is plain data; getsockopt fills it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the fd is a live socket owned by the caller; `cred` and `len` are valid out-pointers
    // sized for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Peer { pid: cred.pid, uid: cred.uid })
}

/// Runs the accept loop until `stop` is set (the caller then connects once to wake it).
pub fn run(listener: UnixListener, shards: Vec<flume::Sender<NewConnection>>, stop: Arc<AtomicBool>) {
    let mut next = 0usize;
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or a transient error: back off instead of spinning.
                eprintln!("kvloft: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = match peer_of(&stream) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("kvloft: dropping a connection whose peer cannot be identified: {e}");
                continue;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let conn = NewConnection { fd: OwnedFd::from(stream), peer };
        // A full shard queue blocks accepting: the backlog then fills and clients wait, which is
        // the bound we want rather than an unbounded queue.
        if shards[next % shards.len()].send(conn).is_err() {
            return; // shards are gone: shutting down
        }
        next = next.wrapping_add(1);
    }
}
