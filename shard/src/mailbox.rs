//! A connection's mailbox: shared memory that carries one request and its reply at a time
//! between a client and the server, next to the Unix socket (decision 47).
//!
//! The server makes it (`attach_mailbox`: a `memfd`, handed to the client with `SCM_RIGHTS`);
//! both map it. The client writes a whole frame into the request area, its length, then bumps
//! the request sequence number; the server, polling the mailbox while it polls the socket, copies
//! the frame out, answers it, writes the reply frame into the reply area and sets the reply
//! sequence number to the request's. Neither side makes a system call, and the request's bytes
//! are copied once on each side instead of through the kernel.
//!
//! The server polls only for a while after a connection's last reply (`[server] spin-us`). It
//! publishes whether it polls in [`SERVER_POLLING`]; a client that posts a request
//! while the server does not poll sends `ring` on the socket, and the server serves the mailbox
//! before it answers the ring. Both sides store, then fence (`SeqCst`), then load the other's
//! word, so at least one of them sees the other: no request is left unseen.
//!
//! Layout (little-endian; every word on its own cache line):
//!
//! | offset | word | written by |
//! |---|---|---|
//! | 0 | magic `KVLMBOX1` (u64) | server, once |
//! | 64 | request sequence number (u64) | client |
//! | 128 | reply sequence number (u64): the request it answers | server |
//! | 192 | 1 while the server polls the mailbox, else 0 (u32) | server |
//! | 256 | request length in bytes (u32) | client |
//! | 320 | reply length in bytes (u32) | server |
//! | 4,096 | request area, [`REQUEST_BYTES`] | client |
//! | 4,096 + [`REQUEST_BYTES`] | reply area, [`REPLY_BYTES`] | server |

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// First word of every mailbox.
pub const MAGIC: u64 = u64::from_le_bytes(*b"KVLMBOX1");
/// Offset of the request sequence number.
pub const REQUEST_SEQ: usize = 64;
/// Offset of the reply sequence number.
pub const REPLY_SEQ: usize = 128;
/// Offset of the server's polling flag.
pub const SERVER_POLLING: usize = 192;
/// Offset of the request length.
pub const REQUEST_LEN: usize = 256;
/// Offset of the reply length.
pub const REPLY_LEN: usize = 320;
/// Offset of the request area.
pub const REQUEST_AREA: usize = 4096;
/// Largest request frame a mailbox carries (a lookup of about 8,000 32-byte hashes); larger
/// requests go over the socket.
pub const REQUEST_BYTES: usize = 256 << 10;
/// Largest reply frame a mailbox carries.
pub const REPLY_BYTES: usize = 64 << 10;
/// Offset of the reply area.
pub const REPLY_AREA: usize = REQUEST_AREA + REQUEST_BYTES;
/// Bytes of a mailbox.
pub const MAILBOX_BYTES: usize = REPLY_AREA + REPLY_BYTES;

/// Why a mailbox could not be made, mapped or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// A system call failed; the message names it. The socket still works: use it instead.
    #[error("{call} failed: {source}")]
    Os {
        /// The call.
        call: &'static str,
        /// What it returned.
        source: std::io::Error,
    },
    /// The shared memory is not a kvloft mailbox (wrong size or magic): a client bug, or another
    /// server version; use the socket.
    #[error("not a kvloft mailbox: {0}")]
    NotAMailbox(String),
    /// The frame does not fit the area; send it over the socket.
    #[error("a {bytes}-byte frame does not fit the mailbox's {room}-byte area; send it over the socket")]
    TooLarge {
        /// The frame's size.
        bytes: usize,
        /// The area's size.
        room: usize,
    },
}

fn os(call: &'static str) -> MailboxError {
    MailboxError::Os { call, source: std::io::Error::last_os_error() }
}

/// One side's mapping of a mailbox; unmapped when dropped.
#[derive(Debug)]
pub struct Mailbox {
    base: *mut u8,
}

// SAFETY: the mapping belongs to the process, not a thread; every access is an atomic word or a
// copy of an area that the protocol gives one side at a time.
unsafe impl Send for Mailbox {}

impl Mailbox {
    /// Makes a new mailbox (server side): a `memfd` of [`MAILBOX_BYTES`] whose size is sealed
    /// (a client cannot shrink it under the server's mapping, which would fault the server),
    /// mapped, with its magic written. Returns the mapping and the descriptor to hand to the
    /// client.
    pub fn create() -> Result<(Mailbox, OwnedFd), MailboxError> {
        // SAFETY: the name is a NUL-terminated literal; the flags are valid.
        let fd = unsafe { libc::memfd_create(c"kvloft-mailbox".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(os("memfd_create"));
        }
        // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is a valid memfd; the length fits off_t.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), MAILBOX_BYTES as libc::off_t) } != 0 {
            return Err(os("ftruncate"));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: `fd` is a memfd made with MFD_ALLOW_SEALING; F_ADD_SEALS takes an int.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(os("fcntl(F_ADD_SEALS)"));
        }
        let mailbox = Self::map_fd(&fd)?;
        // SAFETY: the mapping is MAILBOX_BYTES long and 8-byte aligned (page aligned); no one
        // else has it yet.
        unsafe { mailbox.base.cast::<u64>().write(MAGIC) };
        Ok((mailbox, fd))
    }

    /// Maps a mailbox the server handed over (client side), checking its size and magic.
    pub fn open(fd: &OwnedFd) -> Result<Mailbox, MailboxError> {
        // SAFETY: an all-zero stat is a valid out-parameter; `fd` is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat; `fd` is open.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(os("fstat"));
        }
        if st.st_size as u64 != MAILBOX_BYTES as u64 {
            return Err(MailboxError::NotAMailbox(format!("{} bytes, expected {MAILBOX_BYTES}", st.st_size)));
        }
        let mailbox = Self::map_fd(fd)?;
        if mailbox.word64(0).load(Ordering::Acquire) != MAGIC {
            return Err(MailboxError::NotAMailbox("wrong magic".into()));
        }
        Ok(mailbox)
    }

    fn map_fd(fd: &OwnedFd) -> Result<Mailbox, MailboxError> {
        // SAFETY: a fresh shared mapping of MAILBOX_BYTES of an open file of that size; the
        // kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MAILBOX_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        Ok(Mailbox { base: p.cast() })
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset % 64 == 0 && offset < REQUEST_AREA);
        // SAFETY: the offset lies in the header, 8-byte aligned; the mapping lives as long as
        // `self`, and the other process touches this word only atomically.
        unsafe { &*self.base.add(offset).cast::<AtomicU64>() }
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset % 64 == 0 && offset < REQUEST_AREA);
        // SAFETY: as in `word64`, 4-byte aligned.
        unsafe { &*self.base.add(offset).cast::<AtomicU32>() }
    }

    /// The client's latest request sequence number.
    pub fn request_seq(&self) -> u64 {
        self.word64(REQUEST_SEQ).load(Ordering::Acquire)
    }

    /// The request the latest reply answers.
    pub fn reply_seq(&self) -> u64 {
        self.word64(REPLY_SEQ).load(Ordering::Acquire)
    }

    /// Client: posts `frame` as request `seq` (one more than the last) and returns whether the
    /// server was polling after the post; when it was not, ring it over the socket.
    pub fn post(&self, frame: &[u8], seq: u64) -> Result<bool, MailboxError> {
        if frame.len() > REQUEST_BYTES {
            return Err(MailboxError::TooLarge { bytes: frame.len(), room: REQUEST_BYTES });
        }
        // SAFETY: the request area is REQUEST_BYTES long and only the client writes it; the
        // server reads it only after the sequence number below moves.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), self.base.add(REQUEST_AREA), frame.len()) };
        self.word32(REQUEST_LEN).store(frame.len() as u32, Ordering::Relaxed);
        self.word64(REQUEST_SEQ).store(seq, Ordering::Release);
        fence(Ordering::SeqCst);
        Ok(self.word32(SERVER_POLLING).load(Ordering::Relaxed) == 1)
    }

    /// Client: the reply frame of request `seq`, copied out, once the server wrote it.
    pub fn take_reply(&self, seq: u64) -> Result<Option<Vec<u8>>, MailboxError> {
        if self.reply_seq() != seq {
            return Ok(None);
        }
        let len = self.word32(REPLY_LEN).load(Ordering::Relaxed) as usize;
        if len > REPLY_BYTES {
            return Err(MailboxError::NotAMailbox(format!("reply length {len} exceeds the area")));
        }
        let mut out = vec![0u8; len];
        // SAFETY: `len` is within the reply area, which the server does not write again until
        // the client posts another request.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(REPLY_AREA), out.as_mut_ptr(), len) };
        Ok(Some(out))
    }

    /// Server: says whether it polls. Turning polling off is followed by a fence, so that the
    /// caller's next look at [`Mailbox::request_seq`] sees any request posted before a client
    /// read the flag as set.
    pub fn set_polling(&self, on: bool) {
        self.word32(SERVER_POLLING).store(u32::from(on), Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Server: copies the current request frame into `buf` (replacing its contents). Fails when
    /// the client wrote a length beyond the area.
    pub fn read_request(&self, buf: &mut Vec<u8>) -> Result<(), MailboxError> {
        let len = self.word32(REQUEST_LEN).load(Ordering::Relaxed) as usize;
        if len > REQUEST_BYTES {
            return Err(MailboxError::TooLarge { bytes: len, room: REQUEST_BYTES });
        }
        buf.clear();
        buf.reserve(len);
        // SAFETY: `len` bytes lie within the request area, and `buf` has room for them. The
        // client may scribble on the area meanwhile (it owns it); that changes only the bytes
        // this copy reads, which are then decoded like any untrusted frame.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(REQUEST_AREA), buf.as_mut_ptr(), len);
            buf.set_len(len);
        }
        Ok(())
    }

    /// Server: writes `frame` as the reply to request `seq`.
    pub fn reply(&self, frame: &[u8], seq: u64) -> Result<(), MailboxError> {
        if frame.len() > REPLY_BYTES {
            return Err(MailboxError::TooLarge { bytes: frame.len(), room: REPLY_BYTES });
        }
        // SAFETY: the reply area is REPLY_BYTES long; the client reads it only after the
        // sequence number below moves.
        unsafe { std::ptr::copy_nonoverlapping(frame.as_ptr(), self.base.add(REPLY_AREA), frame.len()) };
        self.word32(REPLY_LEN).store(frame.len() as u32, Ordering::Relaxed);
        self.word64(REPLY_SEQ).store(seq, Ordering::Release);
        Ok(())
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        // SAFETY: `base` is the start of a MAILBOX_BYTES mapping made in `map_fd`, unmapped once.
        unsafe {
            libc::munmap(self.base.cast(), MAILBOX_BYTES);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_reply_cross_two_mappings() {
        let (server, fd) = Mailbox::create().unwrap();
        let client = Mailbox::open(&fd).unwrap();
        server.set_polling(true);
        assert!(client.post(b"request frame", 1).unwrap(), "the server polls");
        assert_eq!(server.request_seq(), 1);
        let mut buf = Vec::new();
        server.read_request(&mut buf).unwrap();
        assert_eq!(buf, b"request frame");
        assert_eq!(client.take_reply(1).unwrap(), None, "no reply yet");
        server.reply(b"reply frame", 1).unwrap();
        assert_eq!(client.take_reply(1).unwrap().unwrap(), b"reply frame");
        server.set_polling(false);
        assert!(!client.post(b"next", 2).unwrap(), "not polling: the client must ring");
    }

    #[test]
    fn a_client_cannot_resize_the_mailbox() {
        let (_server, fd) = Mailbox::create().unwrap();
        // SAFETY: `fd` is a valid memfd; both calls only try to change its size.
        let (shrink, grow) =
            unsafe { (libc::ftruncate(fd.as_raw_fd(), 4096), libc::ftruncate(fd.as_raw_fd(), 1 << 30)) };
        assert_eq!((shrink, grow), (-1, -1), "the size is sealed");
        assert!(Mailbox::open(&fd).is_ok());
    }

    #[test]
    fn oversized_frames_and_lengths_are_refused() {
        let (server, fd) = Mailbox::create().unwrap();
        let client = Mailbox::open(&fd).unwrap();
        let big = vec![0u8; REQUEST_BYTES + 1];
        assert!(matches!(client.post(&big, 1), Err(MailboxError::TooLarge { .. })));
        assert!(matches!(server.reply(&vec![0u8; REPLY_BYTES + 1], 1), Err(MailboxError::TooLarge { .. })));
        // A client that writes a length past the area gets an error, not a read past it.
        client.word32(REQUEST_LEN).store(u32::MAX, Ordering::Relaxed);
        assert!(matches!(server.read_request(&mut Vec::new()), Err(MailboxError::TooLarge { .. })));
    }

    #[test]
    fn other_memory_is_not_a_mailbox() {
        // SAFETY: a fresh memfd of another size.
        let fd = unsafe { libc::memfd_create(c"other".as_ptr(), libc::MFD_CLOEXEC) };
        // SAFETY: `fd` was just returned and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is a valid memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        assert!(matches!(Mailbox::open(&fd), Err(MailboxError::NotAMailbox(_))));
    }
}
