//! A blocking client of protocol v1, for the CLI, tests and benchmarks.

use crate::mailbox::{Mailbox, MailboxError};
use kvloft_engine::protocol::{
    self, AttachMailbox, BlockHashBytes, ErrorCode, ErrorReply, Event, FrameError, FrameKind, Hello, HelloReply,
    LayerMemory, Load, LoadDone, Lookup, LookupReply, NamespaceSpec, PackedSave, RegisterInstance,
    RegisterInstanceReply, RegisterMemory, Release, Reply, Request, Ring, Save, SaveBlock, SaveDone, StatsReply,
    StatsRequest, PROTOCOL_VERSION,
};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No server listens on the path: start one with `kvloft serve`, or pass its socket path.
    #[error("no kvloft server at {path}: {cause}; start one with `kvloft serve` or pass --socket")]
    Unavailable {
        /// The path tried.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The connection broke or timed out mid-call; reconnect.
    #[error("connection to the kvloft server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("the server sent an invalid frame: {0}")]
    Frame(#[from] FrameError),
    /// The server's body did not decode; client and server versions differ.
    #[error("cannot decode the server's reply: {0}; check that client and server versions match")]
    Decode(String),
    /// The server answered with an error frame.
    #[error("server error {code:?}: {message}")]
    Server {
        /// Machine-readable cause.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server answered with a reply of another operation.
    #[error("unexpected reply to `{0}`")]
    UnexpectedReply(&'static str),
    /// The mailbox could not be attached or used; the socket still works without it.
    #[error("mailbox: {0}")]
    Mailbox(#[from] MailboxError),
}

/// Descriptors kept from the server's frames (`attach_mailbox` sends one); older ones are closed.
const MAX_KEPT_FDS: usize = 4;

/// Completions kept for later `wait_event` calls while waiting for another one.
const MAX_PENDING_EVENTS: usize = 1024;

/// A connected, greeted client.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
    buf: Vec<u8>,
    /// The frame being sent, kept between calls so that a large request allocates once.
    out: Vec<u8>,
    events: VecDeque<(u64, Event)>,
    /// How long a wait for the server polls before it sleeps; see [`Client::set_spin`].
    spin: Duration,
    /// Descriptors that came with the server's frames, latest last.
    fds: VecDeque<OwnedFd>,
    /// The mailbox, once attached ([`Client::attach_mailbox`]), and its last request number.
    mailbox: Option<Mailbox>,
    mailbox_seq: u64,
    /// What the server said in `hello`.
    pub server: HelloReply,
}

impl Client {
    /// Connects to `path` and says hello. `timeout` bounds every read and write.
    pub fn connect(path: &Path, client_name: &str, timeout: Duration) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|cause| ClientError::Unavailable { path: path.into(), cause })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut client = Self {
            stream,
            next_id: 1,
            buf: Vec::new(),
            out: Vec::new(),
            events: VecDeque::new(),
            spin: Duration::ZERO,
            fds: VecDeque::new(),
            mailbox: None,
            mailbox_seq: 0,
            server: HelloReply { protocol: 0, server_version: String::new(), shards: 0, pid: 0 },
        };
        let hello =
            Hello { protocol: u32::from(PROTOCOL_VERSION), client: client_name.into(), pid: std::process::id() };
        match client.call(&Request::Hello(hello))? {
            Reply::Hello(h) => client.server = h,
            _ => return Err(ClientError::UnexpectedReply("hello")),
        }
        Ok(client)
    }

    /// Makes each wait for a reply poll the socket for up to `spin` before it sleeps in the
    /// kernel (default 0: sleep at once). Waking a sleeping thread costs several microseconds
    /// (tens on a virtual machine); a caller that wants the lowest round trip and can spare the
    /// CPU while it waits sets about 50-100 us, which covers a lookup's round trip.
    pub fn set_spin(&mut self, spin: Duration) {
        self.spin = spin;
    }

    /// Gives this connection a mailbox: from then on `lookup` and `release` travel through shared
    /// memory instead of the socket (decision 47), ringing the server over the socket when it is
    /// not polling. Requests too large for the mailbox still use the socket.
    pub fn attach_mailbox(&mut self) -> Result<(), ClientError> {
        match self.call(&Request::AttachMailbox(AttachMailbox {}))? {
            Reply::AttachMailbox(_) => {}
            _ => return Err(ClientError::UnexpectedReply("attach_mailbox")),
        }
        let fd = self
            .fds
            .pop_back()
            .ok_or_else(|| ClientError::Mailbox(MailboxError::NotAMailbox("the reply carried no descriptor".into())))?;
        self.mailbox = Some(Mailbox::open(&fd)?);
        Ok(())
    }

    /// Whether a mailbox is attached.
    pub fn has_mailbox(&self) -> bool {
        self.mailbox.is_some()
    }

    /// Sends the request frame in `self.out` (request id `id`) through the mailbox and decodes
    /// its reply.
    fn call_mailbox(&mut self, id: u64) -> Result<Reply, ClientError> {
        let out = std::mem::take(&mut self.out);
        let answer = self.mailbox_exchange(&out);
        self.out = out;
        let frame = answer?;
        if frame.request_id != id && frame.request_id != 0 {
            return Err(ClientError::Decode(format!(
                "the mailbox answered request {} instead of {id}",
                frame.request_id
            )));
        }
        match frame.kind {
            FrameKind::Reply => protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string())),
            FrameKind::Error => Err(server_error(&frame.body)),
            _ => Err(ClientError::Decode("the mailbox held neither a reply nor an error".into())),
        }
    }

    /// Posts `frame` (any bytes: normally one whole request frame) to the mailbox and returns
    /// the frame the server answered with, a reply or an error. Polls the mailbox for up to the
    /// client's spin (at least 50 us), ringing the server over the socket when it was not
    /// polling or did not answer by then. Fails without a mailbox, or for a frame larger than
    /// its request area.
    pub fn mailbox_exchange(&mut self, frame: &[u8]) -> Result<protocol::Frame, ClientError> {
        let Some(mb) = self.mailbox.as_ref() else {
            return Err(ClientError::Mailbox(MailboxError::NotAMailbox("none attached; call attach_mailbox".into())));
        };
        let seq = self.mailbox_seq + 1;
        let polling = mb.post(frame, seq)?;
        self.mailbox_seq = seq;
        let mut answer = None;
        if polling {
            let start = std::time::Instant::now();
            let limit = self.spin.max(Duration::from_micros(50));
            while answer.is_none() && start.elapsed() < limit {
                answer = mb.take_reply(seq)?;
                std::hint::spin_loop();
            }
        }
        if answer.is_none() {
            // The ring's reply comes after the mailbox's.
            let ring = self.send(&Request::Ring(Ring {}))?;
            match self.read_reply(ring)? {
                Reply::Ring(_) => {}
                _ => return Err(ClientError::UnexpectedReply("ring")),
            }
            let mb = self.mailbox.as_ref().ok_or(ClientError::UnexpectedReply("mailbox"))?;
            answer = mb.take_reply(seq)?;
        }
        let bytes =
            answer.ok_or_else(|| ClientError::Decode("the server answered the ring but not the mailbox".into()))?;
        let (frame, _) = protocol::decode(&bytes)?
            .ok_or_else(|| ClientError::Decode("the mailbox's reply is not a whole frame".into()))?;
        Ok(frame)
    }

    /// Server figures.
    pub fn stats(&mut self) -> Result<StatsReply, ClientError> {
        match self.call(&Request::Stats(StatsRequest {}))? {
            Reply::Stats(s) => Ok(s),
            _ => Err(ClientError::UnexpectedReply("stats")),
        }
    }

    /// Joins `instance` with its namespace.
    pub fn register_instance(
        &mut self,
        instance: &str,
        namespace: NamespaceSpec,
    ) -> Result<RegisterInstanceReply, ClientError> {
        match self.call(&Request::RegisterInstance(RegisterInstance { instance: instance.into(), namespace }))? {
            Reply::RegisterInstance(r) => Ok(r),
            _ => Err(ClientError::UnexpectedReply("register_instance")),
        }
    }

    /// Registers this process's KV memory for `rank` (host backend); returns the slice size.
    /// First grants the server access to this process's memory where Yama restricts ptrace.
    pub fn register_memory(&mut self, rank: u32, layers: Vec<LayerMemory>) -> Result<u64, ClientError> {
        grant_access(self.server.pid);
        match self.call(&Request::RegisterMemory(RegisterMemory {
            rank,
            device: "cpu".into(),
            layers,
            gpu_uuid: None,
            ipc: vec![],
        }))? {
            Reply::RegisterMemory(r) => Ok(r.slice_bytes),
            _ => Err(ClientError::UnexpectedReply("register_memory")),
        }
    }

    /// Registers GPU memory for `rank` (the cuda backend): the GPU's UUID and, per layer, the CUDA
    /// IPC handle of its allocation and the offset of its block 0 in it (each layer's `base` is
    /// that offset). Returns the slice size.
    pub fn register_cuda_memory(
        &mut self,
        rank: u32,
        layers: Vec<LayerMemory>,
        gpu_uuid: [u8; 16],
        ipc: Vec<(Vec<u8>, u64)>,
    ) -> Result<u64, ClientError> {
        let ipc = ipc
            .into_iter()
            .map(|(handle, offset)| kvloft_engine::protocol::IpcRegion { handle: BlockHashBytes::from(handle), offset })
            .collect();
        match self.call(&Request::RegisterMemory(RegisterMemory {
            rank,
            device: "cuda:0".into(),
            layers,
            gpu_uuid: Some(BlockHashBytes::from(gpu_uuid.to_vec())),
            ipc,
        }))? {
            Reply::RegisterMemory(r) => Ok(r.slice_bytes),
            _ => Err(ClientError::UnexpectedReply("register_memory")),
        }
    }

    /// Leading hits among `hashes` and the lease pinning them.
    pub fn lookup(&mut self, hashes: &[Vec<u8>]) -> Result<LookupReply, ClientError> {
        // One packed byte string when the hashes share a length (the usual case), written
        // straight into the frame; else the list form.
        let id = self.next_id;
        self.out.clear();
        let reply = if protocol::encode_packed_lookup(&mut self.out, id, hashes.iter().map(Vec::as_slice)).is_some() {
            self.next_id += 1;
            if self.mailbox.is_some() && self.out.len() <= crate::mailbox::REQUEST_BYTES {
                self.call_mailbox(id)?
            } else {
                self.stream.write_all(&self.out)?;
                self.read_reply(id)?
            }
        } else {
            let list = hashes.iter().map(|h| BlockHashBytes::from(h.clone())).collect();
            self.call(&Request::Lookup(Lookup { hashes: list, packed: None }))?
        };
        match reply {
            Reply::Lookup(r) => Ok(r),
            _ => Err(ClientError::UnexpectedReply("lookup")),
        }
    }

    /// Asks for a save of `(hash, engine block id)` pairs and returns its request id once the
    /// server queued it, without waiting for the copy: several saves (and loads) may be in
    /// flight on one connection; [`Client::wait_saved`] waits for one.
    pub fn save_queued(&mut self, blocks: &[(Vec<u8>, u32)]) -> Result<u64, ClientError> {
        let request = match PackedSave::pack(blocks.iter().map(|(h, id)| (h.as_slice(), *id))) {
            Some(packed) => Save { blocks: vec![], packed: Some(packed), after_event: None, layer_events: None },
            None => Save {
                blocks: blocks
                    .iter()
                    .map(|(h, id)| SaveBlock { hash: BlockHashBytes::from(h.clone()), block_id: *id })
                    .collect(),
                packed: None,
                after_event: None,
                layer_events: None,
            },
        };
        let id = self.send(&Request::Save(request))?;
        self.expect_queued(id, "save")?;
        Ok(id)
    }

    /// Saves `(hash, engine block id)` pairs and waits for the completion.
    pub fn save(&mut self, blocks: &[(Vec<u8>, u32)]) -> Result<SaveDone, ClientError> {
        let id = self.save_queued(blocks)?;
        self.wait_saved(id)
    }

    /// Waits for the completion of the save [`Client::save_queued`] numbered `id`.
    pub fn wait_saved(&mut self, id: u64) -> Result<SaveDone, ClientError> {
        match self.wait_event(id)? {
            Event::SaveDone(d) => Ok(d),
            _ => Err(ClientError::UnexpectedReply("save")),
        }
    }

    /// Asks for a load of the lease's first `block_ids.len()` hits into these engine blocks and
    /// returns its request id once the server queued it, without waiting for the copy: several
    /// loads (and saves) may be in flight on one connection; [`Client::wait_loaded`] waits for
    /// one.
    pub fn load_queued(&mut self, lease: u64, block_ids: &[u32]) -> Result<u64, ClientError> {
        let packed = block_ids.iter().flat_map(|id| id.to_le_bytes()).collect::<Vec<u8>>();
        let request =
            Load { lease, block_ids: vec![], block_ids_packed: Some(BlockHashBytes::from(packed)), layerwise: false };
        let id = self.send(&Request::Load(request))?;
        self.expect_queued(id, "load")?;
        Ok(id)
    }

    /// Loads the lease's first `block_ids.len()` hits into these engine blocks and waits.
    pub fn load(&mut self, lease: u64, block_ids: &[u32]) -> Result<LoadDone, ClientError> {
        let id = self.load_queued(lease, block_ids)?;
        self.wait_loaded(id)
    }

    /// Waits for the completion of the load [`Client::load_queued`] numbered `id`.
    pub fn wait_loaded(&mut self, id: u64) -> Result<LoadDone, ClientError> {
        match self.wait_event(id)? {
            Event::LoadDone(d) => Ok(d),
            _ => Err(ClientError::UnexpectedReply("load")),
        }
    }

    /// Gives up a lease.
    pub fn release(&mut self, lease: u64) -> Result<(), ClientError> {
        match self.call(&Request::Release(Release { lease }))? {
            Reply::Release(_) => Ok(()),
            _ => Err(ClientError::UnexpectedReply("release")),
        }
    }

    /// Sends `request` and waits for its reply; completion events that arrive meanwhile are kept
    /// for [`Client::wait_event`].
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        if self.mailbox.is_some() && matches!(request, Request::Lookup(_) | Request::Release(_)) {
            let id = self.next_id;
            self.next_id += 1;
            self.out.clear();
            protocol::encode(&mut self.out, FrameKind::Request, id, &protocol::to_body(request));
            if self.out.len() <= crate::mailbox::REQUEST_BYTES {
                return self.call_mailbox(id);
            }
            self.stream.write_all(&self.out)?;
            return self.read_reply(id);
        }
        let id = self.send(request)?;
        self.read_reply(id)
    }

    fn send(&mut self, request: &Request) -> Result<u64, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        protocol::encode(&mut self.out, FrameKind::Request, id, &protocol::to_body(request));
        self.stream.write_all(&self.out)?;
        Ok(id)
    }

    fn expect_queued(&mut self, id: u64, op: &'static str) -> Result<(), ClientError> {
        match self.read_reply(id)? {
            Reply::Save(_) | Reply::Load(_) => Ok(()),
            _ => Err(ClientError::UnexpectedReply(op)),
        }
    }

    /// Waits for the completion event of request `id`.
    pub fn wait_event(&mut self, id: u64) -> Result<Event, ClientError> {
        if let Some(pos) = self.events.iter().position(|(i, _)| *i == id) {
            if let Some((_, event)) = self.events.remove(pos) {
                return Ok(event);
            }
        }
        loop {
            let frame = self.read_frame()?;
            match frame.kind {
                FrameKind::Event if frame.request_id == id => {
                    return protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string()))
                }
                FrameKind::Event => self.keep_event(&frame)?,
                FrameKind::Error if frame.request_id == id || frame.request_id == 0 => {
                    return Err(server_error(&frame.body))
                }
                _ => {}
            }
        }
    }

    fn keep_event(&mut self, frame: &protocol::Frame) -> Result<(), ClientError> {
        let event: Event = protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string()))?;
        if self.events.len() == MAX_PENDING_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back((frame.request_id, event));
        Ok(())
    }

    fn read_reply(&mut self, id: u64) -> Result<Reply, ClientError> {
        loop {
            let frame = self.read_frame()?;
            if frame.kind == FrameKind::Event {
                self.keep_event(&frame)?;
                continue;
            }
            if frame.request_id != id && frame.request_id != 0 {
                continue;
            }
            return match frame.kind {
                FrameKind::Reply => protocol::from_body(&frame.body).map_err(|e| ClientError::Decode(e.to_string())),
                FrameKind::Error => Err(server_error(&frame.body)),
                _ => continue,
            };
        }
    }

    fn read_frame(&mut self) -> Result<protocol::Frame, ClientError> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            if let Some((frame, used)) = protocol::decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let n = match self.poll_read(&mut chunk)? {
                Some(n) => n,
                None => self.recv(&mut chunk, 0)?,
            };
            if n == 0 {
                return Err(
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "server closed the connection").into()
                );
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Client {
    /// One `recvmsg` into `buf` with `flags`, keeping any descriptors the server attached.
    fn recv(&mut self, buf: &mut [u8], flags: libc::c_int) -> std::io::Result<usize> {
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // Room for a few descriptors; the server sends one at a time.
        let mut control = [0u64; 8];
        // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        loop {
            // SAFETY: `msg` points at `buf` (writable, `buf.len()` bytes) and `control`, both live
            // for the call; the descriptor belongs to `self.stream`.
            let n = unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, flags | libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            // SAFETY: the kernel filled `msg`'s control buffer; the CMSG macros walk it within
            // `msg_controllen`, and each SCM_RIGHTS header's data holds whole descriptors that
            // are now ours.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(cmsg);
                        let bytes = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                        for i in 0..bytes / std::mem::size_of::<libc::c_int>() {
                            let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                            if self.fds.len() == MAX_KEPT_FDS {
                                self.fds.pop_front();
                            }
                            self.fds.push_back(OwnedFd::from_raw_fd(fd));
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
                }
            }
            return Ok(n as usize);
        }
    }

    /// Reads what is there without sleeping, retrying for up to `self.spin`; `None` when nothing
    /// came in that time.
    fn poll_read(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        if self.spin.is_zero() {
            return Ok(None);
        }
        let start = std::time::Instant::now();
        loop {
            let e = match self.recv(buf, libc::MSG_DONTWAIT) {
                Ok(n) => return Ok(Some(n)),
                Err(e) => e,
            };
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {}
                _ => return Err(e),
            }
            if start.elapsed() >= self.spin {
                return Ok(None);
            }
            std::hint::spin_loop();
        }
    }
}

fn server_error(body: &[u8]) -> ClientError {
    match protocol::from_body::<ErrorReply>(body) {
        Ok(e) => ClientError::Server { code: e.code, message: e.message },
        Err(e) => ClientError::Decode(e.to_string()),
    }
}

/// Lets process `server_pid` read and write this process's memory (`prctl(PR_SET_PTRACER)`),
/// which the host backend needs where Yama's `ptrace_scope` is 1. Without Yama the call fails
/// with EINVAL and nothing is needed; other failures surface later as a copy error.
fn grant_access(server_pid: u32) {
    if server_pid == 0 {
        return;
    }
    // SAFETY: PR_SET_PTRACER takes a pid as its only argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_PTRACER, libc::c_ulong::from(server_pid), 0, 0, 0);
    }
}
