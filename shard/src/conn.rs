//! One client connection: read frames, answer requests, write replies and events.
//!
//! A connection lives on one shard. A reader loop decodes frames and answers them in order; a
//! writer task owns the socket's write half and sends whatever the reader and the connection's
//! background work (save and load completions) queue for it, through a bounded channel. The read
//! buffer holds at most one frame of [`MAX_FRAME_BYTES`] plus one read. An error in a frame is
//! answered with an error frame and the connection goes on, unless the stream is out of step (bad
//! magic or length), when the error is sent and the connection closed. When the client goes away,
//! the leases it took are released at once. Other connections are never affected.

use crate::acceptor::Peer;
use crate::gpu_path::{Layerwise, SaveAfter};
use crate::mailbox::{self, Mailbox};
use crate::shard::{MeshMsg, ShardCtx};
use crate::store::{self, EngineMemory, InstanceOp, LeaseOp, StoreError};
use crate::trace;
use futures_lite::io::{ReadHalf, WriteHalf};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::UnixStream;
use kvloft_engine::key::{BlockHash, PackedKeys};
use kvloft_engine::limits::DEFAULT_LEASE_TTL_MS;
use kvloft_engine::namespace::NamespaceId;
use kvloft_engine::protocol::{
    self, BlockHashBytes, BodyError, Done, ErrorCode, ErrorReply, Event, FrameError, FrameKind, FrameRef, HelloReply,
    LoadDone, LoadLayers, LookupReply, MailboxReply, Queued, RegisterInstanceReply, RegisterMemoryReply, Reply,
    Request, SaveDone, StatsReply, LEN_BYTES, MAX_BATCH_BLOCKS, MAX_FRAME_BYTES, MAX_HASH_BYTES, MAX_LAYERS,
    PROTOCOL_VERSION,
};
use kvloft_gpu::host::HostMemory;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// How long a `stats` request waits for another shard's figures.
const SHARD_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Frames queued for the writer before the reader (and background work) wait.
const OUTBOX_FRAMES: usize = 256;
/// The pause between two direct reads of a connection that is polling its socket.
const SPIN_READ_PAUSE: Duration = Duration::from_micros(1);
/// How long a polling connection with a mailbox watches it without yielding, between looks at
/// its socket (decision 47).
const MAILBOX_BURST: Duration = Duration::from_micros(5);
/// Leases a connection remembers for release on disconnect; older ones still expire by TTL.
const MAX_LEASES_PER_CONNECTION: usize = 4096;
/// Longest instance id accepted.
const MAX_INSTANCE_BYTES: usize = 256;

/// Serves `stream` on the current shard until the client hangs up. `fd` is the stream's
/// descriptor, which the connection reads directly while it polls (see `spin_read`).
pub(crate) fn spawn(ctx: Rc<ShardCtx>, stream: UnixStream, peer: Peer, fd: RawFd) {
    glommio::spawn_local(async move {
        ctx.metrics.connections.inc();
        let (reader, writer) = futures_lite::io::split(stream);
        let (out, outbox) = local_channel::new_bounded(OUTBOX_FRAMES);
        let queued = Rc::new(Cell::new(0));
        let writer = glommio::spawn_local(write_loop(writer, outbox, queued.clone()));
        let conn = Rc::new(Connection {
            ctx: ctx.clone(),
            peer,
            state: RefCell::new(State::default()),
            out,
            queued,
            fd,
            pending_pins: RefCell::new(None),
            mailbox: RefCell::new(None),
            mailbox_seen: Cell::new(0),
            mailbox_buf: RefCell::new(Vec::new()),
            in_mailbox: Cell::new(false),
            sealing: Cell::new(0),
            pending_fd: RefCell::new(None),
            frame_at: Cell::new(Instant::now()),
            trace: RefCell::new(None),
            copies: Cell::new(0),
            answered_at: Cell::new(Instant::now()),
        });
        let _ = conn.clone().read_loop(reader, fd).await;
        conn.close().await;
        drop(conn);
        writer.await;
        ctx.metrics.connections.dec();
    })
    .detach();
}

/// Writes the frames queued in `outbox` in order; `queued` counts those not yet fully written.
async fn write_loop(mut writer: WriteHalf<UnixStream>, outbox: LocalReceiver<Vec<u8>>, queued: Rc<Cell<usize>>) {
    while let Some(frame) = outbox.recv().await {
        if writer.write_all(&frame).await.is_err() {
            return;
        }
        queued.set(queued.get() - 1);
    }
    let _ = writer.close().await;
}

/// What a connection has registered.
#[derive(Debug, Default)]
struct State {
    greeted: bool,
    instance: Option<Instance>,
    memory: Option<(u32, EngineMemory)>,
    leases: Vec<u64>,
    /// CUDA events the worker shared for ordering its saves, opened once each (a worker
    /// re-records the same events every step), at most [`MAX_EVENTS_PER_CONNECTION`], the
    /// oldest closed first.
    events: HashMap<[u8; 64], Arc<kvloft_gpu::cuda::IpcEvent>>,
    /// The order `events` were opened in.
    event_order: VecDeque<[u8; 64]>,
    /// The events kvloft records behind each layer of this connection's layer-wise loads, one
    /// per registered layer, made on the first such load.
    layer_marks: Vec<Arc<kvloft_gpu::cuda::SharedEvent>>,
}

/// Distinct CUDA IPC events one connection may have open: a layer-wise save's per-layer events
/// and a few more.
const MAX_EVENTS_PER_CONNECTION: usize = MAX_LAYERS + 16;

#[derive(Debug, Clone)]
struct Instance {
    name: String,
    ns: NamespaceId,
    ranks: u32,
}

struct Connection {
    ctx: Rc<ShardCtx>,
    peer: Peer,
    state: RefCell<State>,
    /// Frames for the writer task.
    out: LocalSender<Vec<u8>>,
    /// Frames handed to the writer and not yet fully written: while 0, a frame may be written
    /// straight to the socket without overtaking one.
    queued: Rc<Cell<usize>>,
    /// The socket, for those direct writes (and the reads of `spin_read`).
    fd: RawFd,
    /// The pins of the lookup being answered, taken once its reply is written (decision 44).
    pending_pins: RefCell<Option<store::PendingPins>>,
    /// The connection's mailbox once `attach_mailbox` made one (decision 47), the last request
    /// number served from it, and the buffer its requests are copied into.
    mailbox: RefCell<Option<Rc<Mailbox>>>,
    mailbox_seen: Cell<u64>,
    mailbox_buf: RefCell<Vec<u8>>,
    /// Set while a request from the mailbox is answered.
    in_mailbox: Cell<bool>,
    /// Saves whose `save_done` is written and whose owner messages (seals) are still being
    /// queued: the connection's next request waits for them, so that it reaches each owner after
    /// them (decision 55).
    sealing: Cell<u32>,
    /// The descriptor that the reply being sent hands over (`attach_mailbox`).
    pending_fd: RefCell<Option<OwnedFd>>,
    /// When the frame being answered was read, and the trace of the GPU request it started
    /// (`KVLOFT_TRACE_GPU`, see `trace`).
    frame_at: Cell<Instant>,
    trace: RefCell<trace::Trace>,
    /// GPU copies of this connection that wait for nothing the client controls and whose
    /// completion is not written yet, and when the last completion was written: `spin_read`
    /// keeps polling the socket through such a copy and for `[server] spin-us` after its
    /// completion, as after a reply, since the client's next request usually follows it
    /// (decision 58).
    copies: Cell<u32>,
    answered_at: Cell<Instant>,
}

/// What [`Connection::spin_read`] found.
enum Polled {
    /// Bytes (or an error) from the socket.
    Read(std::io::Result<usize>),
    /// A request waiting in the mailbox.
    Mailbox,
    /// Nothing within the polling time: wait through the reactor.
    Idle,
}

/// An error to send back: code and text.
struct Failure(ErrorCode, String);

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure(e.0, e.1)
    }
}

impl Connection {
    async fn read_loop(self: Rc<Self>, mut reader: ReadHalf<UnixStream>, fd: RawFd) -> std::io::Result<()> {
        // Reads land in `buf[end..]` and frames are decoded in place from `buf[start..end]`: no
        // copy of a request between the socket and its decoder. The unread tail moves to the
        // front before a read that would not fit, and `buf` grows only for a frame larger than
        // what it holds, so it stays within one frame of MAX_FRAME_BYTES plus one read.
        let mut buf = vec![0u8; 2 * READ_CHUNK_BYTES];
        let (mut start, mut end) = (0, 0);
        loop {
            while start < end {
                match protocol::decode_ref(&buf[start..end]) {
                    Ok(None) => break,
                    Ok(Some((frame, used))) => {
                        start += used;
                        self.answer(&frame).await;
                    }
                    Err(e) if e.is_fatal() => {
                        self.error(0, ErrorCode::BadFrame, format!("{e} (closing the connection)")).await;
                        return Ok(());
                    }
                    Err(e) => {
                        // The frame is whole (decode checked) and its length is trustworthy: skip it.
                        let len = protocol::frame_len(&buf[start..end]).ok().flatten().unwrap_or(0);
                        start += LEN_BYTES + len;
                        let code = match e {
                            FrameError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                            _ => ErrorCode::BadFrame,
                        };
                        self.error(e.request_id(), code, e.to_string()).await;
                    }
                }
            }
            if start >= end {
                (start, end) = (0, 0);
            } else if buf.len() - end < READ_CHUNK_BYTES {
                buf.copy_within(start..end, 0);
                (start, end) = (0, end - start);
            }
            debug_assert!(end - start <= LEN_BYTES + MAX_FRAME_BYTES);
            if buf.len() - end < READ_CHUNK_BYTES {
                buf.resize(end + READ_CHUNK_BYTES, 0);
            }
            let n = match self.spin_read(fd, &mut buf[end..]).await {
                Polled::Read(n) => n?,
                Polled::Mailbox => {
                    self.serve_mailbox().await;
                    continue;
                }
                Polled::Idle => reader.read(&mut buf[end..]).await?,
            };
            if n == 0 {
                return Ok(());
            }
            end += n;
        }
    }

    /// Reads what the client sent without waiting for the reactor: tries the socket directly,
    /// and while nothing is there keeps trying for up to `[server] spin-us`, letting the executor
    /// poll its other I/O, mesh and timers between tries. `None` when nothing came in that time
    /// (the caller then waits through the reactor).
    ///
    /// A request usually follows its connection's previous reply within microseconds; noticing it
    /// through the reactor's readiness poll costs a completion round through the kernel (about
    /// 8 us per request on the H100 box), which this avoids while the connection is busy. Servers
    /// of every shard count do it since the allocator stopped serialising shards (decision 51;
    /// decision 38 had kept it to single-shard servers).
    ///
    /// A connection with a mailbox polls it too, and says so in the mailbox while it does: a
    /// client that posts a request meanwhile need not ring (decision 47).
    async fn spin_read(&self, fd: RawFd, buf: &mut [u8]) -> Polled {
        let spin = Duration::from_micros(self.ctx.shared.topology.server.spin_us);
        let mailbox = self.mailbox.borrow().clone();
        if let Some(mb) = mailbox.as_ref().filter(|_| !spin.is_zero()) {
            mb.set_polling(true);
        }
        let waiting = |mb: &Mailbox| mb.request_seq() != self.mailbox_seen.get();
        let start = Instant::now();
        loop {
            if let Some(mb) = mailbox.as_deref() {
                // A burst of loads of the mailbox's word, no system call: a request is noticed
                // within nanoseconds instead of at the next round of the executor. The burst is
                // short so that the shard's other tasks wait at most that long.
                let burst = Instant::now();
                loop {
                    if waiting(mb) {
                        return Polled::Mailbox;
                    }
                    if spin.is_zero() || burst.elapsed() >= MAILBOX_BURST {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes for the whole call,
            // and `fd` is this connection's socket, open until the connection task ends.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if n >= 0 {
                return Polled::Read(Ok(n as usize));
            }
            let e = std::io::Error::last_os_error();
            if !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) {
                return Polled::Read(Err(e));
            }
            if self.copies.get() == 0 && start.max(self.answered_at.get()).elapsed() >= spin {
                if let Some(mb) = mailbox.as_deref() {
                    // Off, then one more look: a request posted before a client saw the flag
                    // off is seen here; one posted after is rung for.
                    mb.set_polling(false);
                    if waiting(mb) {
                        return Polled::Mailbox;
                    }
                }
                return Polled::Idle;
            }
            // A timer rather than a bare yield: the executor polls its I/O before it fires.
            glommio::timer::sleep(SPIN_READ_PAUSE).await;
        }
    }

    /// Sends a frame after every frame sent before it. When none is waiting, the frame is
    /// written to the socket at once, as far as the socket takes it without blocking: a reply
    /// then leaves in one system call, with no hop through the writer task and the reactor's
    /// submission queue. The writer sends whatever is left.
    async fn send(&self, kind: FrameKind, id: u64, body: &[u8]) {
        if let Some(rest) = self.send_now(kind, id, body) {
            self.queue(rest).await;
        }
    }

    /// The synchronous part of [`Connection::send`]: writes the frame to the socket when nothing
    /// is queued for the writer, and returns what the socket did not take (the whole frame when
    /// something is queued), for [`Connection::queue`].
    fn send_now(&self, kind: FrameKind, id: u64, body: &[u8]) -> Option<Vec<u8>> {
        let mut frame = Vec::with_capacity(LEN_BYTES + protocol::HEADER_BYTES + body.len());
        protocol::encode(&mut frame, kind, id, body);
        if self.queued.get() == 0 {
            // SAFETY: `frame` is a live buffer of `frame.len()` bytes for the whole call, and
            // `self.fd` is this connection's socket, open until the connection task ends.
            let n = unsafe {
                libc::send(self.fd, frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            if n >= 0 && n as usize == frame.len() {
                return None;
            }
            if n > 0 {
                frame.drain(..n as usize);
            }
            // Full socket or an error: the writer waits for room, or meets the error and ends.
        }
        Some(frame)
    }

    /// Hands the writer task (the rest of) a frame.
    async fn queue(&self, frame: Vec<u8>) {
        self.queued.set(self.queued.get() + 1);
        let _ = self.out.send(frame).await;
    }

    async fn error(&self, id: u64, code: ErrorCode, message: String) {
        self.ctx.metrics.errors.inc();
        self.send(FrameKind::Error, id, &protocol::to_body(&ErrorReply { code, message })).await;
    }

    async fn answer(self: &Rc<Self>, frame: &FrameRef<'_>) {
        self.ctx.metrics.requests.inc();
        self.frame_at.set(Instant::now());
        let id = frame.request_id;
        let reply = self.reply(frame).await;
        if matches!(reply, Ok(Reply::Save(_) | Reply::Load(_))) && self.on_gpu() {
            // The task this request spawned runs up to its first wait, which queues its GPU
            // copy, before this task writes the `queued` reply: the socket write then overlaps
            // the copy instead of delaying its start (decision 58).
            futures_lite::future::yield_now().await;
        }
        if matches!(reply, Ok(Reply::Ring(_))) {
            // The mailbox's reply first, then the ring's.
            self.serve_mailbox().await;
        }
        if let Some(fd) = self.pending_fd.take() {
            if let Ok(reply) = &reply {
                self.send_with_fd(id, &protocol::to_body(reply), fd).await;
                return;
            }
        }
        // A lookup that answers before it pins: the pins are taken right after the answer's
        // synchronous write, before anything can await (and let another task evict).
        let pending = self.pending_pins.take();
        match reply {
            Ok(reply) => {
                let rest = self.send_now(FrameKind::Reply, id, &protocol::to_body(&reply));
                if let Some(t) = self.trace.borrow_mut().take() {
                    trace::mark(&Some(t), "queued");
                }
                if let Some(pending) = pending {
                    self.ctx.pin_found(pending);
                }
                if let Some(rest) = rest {
                    self.queue(rest).await;
                }
            }
            Err(Failure(code, message)) => {
                if let Some(pending) = pending {
                    self.ctx.pin_found(pending);
                }
                self.error(id, code, message).await
            }
        }
    }

    /// Answers the request waiting in the mailbox, if any, into the mailbox: its reply or
    /// error frame, or an error frame naming what is wrong with the mailbox's contents. A reply
    /// too large for the mailbox is replaced by an error saying so.
    async fn serve_mailbox(self: &Rc<Self>) {
        let Some(mb) = self.mailbox.borrow().clone() else { return };
        let seq = mb.request_seq();
        if seq == self.mailbox_seen.get() {
            return;
        }
        self.mailbox_seen.set(seq);
        self.ctx.metrics.requests.inc();
        let mut buf = std::mem::take(&mut *self.mailbox_buf.borrow_mut());
        let mut out = Vec::new();
        let failure = |out: &mut Vec<u8>, id: u64, code: ErrorCode, message: String| {
            self.ctx.metrics.errors.inc();
            out.clear();
            protocol::encode(out, FrameKind::Error, id, &protocol::to_body(&ErrorReply { code, message }));
        };
        match mb.read_request(&mut buf) {
            Err(e) => failure(&mut out, 0, ErrorCode::BadFrame, e.to_string()),
            Ok(()) => match protocol::decode_ref(&buf) {
                Ok(Some((frame, used))) if used == buf.len() => {
                    let id = frame.request_id;
                    self.in_mailbox.set(true);
                    let reply = self.reply(&frame).await;
                    self.in_mailbox.set(false);
                    let pending = self.pending_pins.take();
                    match reply {
                        Ok(reply) => protocol::encode(&mut out, FrameKind::Reply, id, &protocol::to_body(&reply)),
                        Err(Failure(code, message)) => failure(&mut out, id, code, message),
                    }
                    if out.len() > mailbox::REPLY_BYTES {
                        let message = format!(
                            "the reply of {} bytes does not fit the mailbox's {}; send this request over the socket",
                            out.len(),
                            mailbox::REPLY_BYTES
                        );
                        failure(&mut out, id, ErrorCode::BadRequest, message);
                    }
                    let _ = mb.reply(&out, seq);
                    if let Some(pending) = pending {
                        self.ctx.pin_found(pending);
                    }
                    *self.mailbox_buf.borrow_mut() = buf;
                    return;
                }
                Ok(_) => failure(
                    &mut out,
                    0,
                    ErrorCode::BadFrame,
                    format!("the mailbox's {} request bytes are not exactly one whole frame", buf.len()),
                ),
                Err(e) => failure(&mut out, e.request_id(), ErrorCode::BadFrame, e.to_string()),
            },
        }
        let _ = mb.reply(&out, seq);
        *self.mailbox_buf.borrow_mut() = buf;
    }

    /// `attach_mailbox`: makes the connection's mailbox and keeps its descriptor for the reply.
    fn attach_mailbox(&self) -> Result<Reply, Failure> {
        if self.in_mailbox.get() {
            return Err(Failure(ErrorCode::BadRequest, "send attach_mailbox over the socket, not the mailbox".into()));
        }
        if self.mailbox.borrow().is_some() {
            return Err(Failure(ErrorCode::AlreadyRegistered, "this connection already has a mailbox".into()));
        }
        let (mb, fd) = Mailbox::create()
            .map_err(|e| Failure(ErrorCode::Internal, format!("cannot make a mailbox ({e}); keep using the socket")))?;
        *self.mailbox.borrow_mut() = Some(Rc::new(mb));
        *self.pending_fd.borrow_mut() = Some(fd);
        Ok(Reply::AttachMailbox(MailboxReply {
            bytes: mailbox::MAILBOX_BYTES as u64,
            request_bytes: mailbox::REQUEST_BYTES as u64,
            reply_bytes: mailbox::REPLY_BYTES as u64,
        }))
    }

    /// Sends a reply frame with `fd` attached (`SCM_RIGHTS`), after every frame queued before it.
    async fn send_with_fd(&self, id: u64, body: &[u8], fd: OwnedFd) {
        while self.queued.get() > 0 {
            glommio::timer::sleep(SPIN_READ_PAUSE).await;
        }
        let mut frame = Vec::with_capacity(LEN_BYTES + protocol::HEADER_BYTES + body.len());
        protocol::encode(&mut frame, FrameKind::Reply, id, body);
        let mut tries = 0;
        loop {
            match send_fd(self.fd, &frame, fd.as_raw_fd()) {
                Ok(n) => {
                    if n < frame.len() {
                        frame.drain(..n);
                        self.queue(frame).await;
                    }
                    return;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && tries < 1000 => {
                    tries += 1;
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                // The client stopped reading or went away; the read loop sees the rest.
                Err(_) => return,
            }
        }
    }

    async fn reply(self: &Rc<Self>, frame: &FrameRef<'_>) -> Result<Reply, Failure> {
        // A save that answered its client before queueing its seals finishes queueing them
        // first (a few microseconds; they are sends on the owners' channels).
        while self.sealing.get() > 0 {
            futures_lite::future::yield_now().await;
        }
        if frame.kind != FrameKind::Request {
            return Err(Failure(
                ErrorCode::BadFrame,
                format!("a client may send only request frames (kind 1), not kind {}", frame.kind as u8),
            ));
        }
        // The Rust client's lookups, read in place: the same checks as below, no owned request.
        if let Some(view) = protocol::PackedLookupView::parse(frame.body) {
            if self.ctx.stopping.get() {
                return Err(Failure(ErrorCode::ShuttingDown, "the server is shutting down; reconnect later".into()));
            }
            if !self.state.borrow().greeted {
                return Err(Failure(
                    ErrorCode::HelloRequired,
                    "`lookup` was sent before `hello`; send hello first on every connection".into(),
                ));
            }
            return self.lookup_packed(view).await;
        }
        let request = parse_request(frame.body)?;
        if self.ctx.stopping.get() {
            return Err(Failure(ErrorCode::ShuttingDown, "the server is shutting down; reconnect later".into()));
        }
        if let Request::Hello(hello) = &request {
            return self.hello(hello.protocol);
        }
        if !self.state.borrow().greeted {
            return Err(Failure(
                ErrorCode::HelloRequired,
                format!("`{}` was sent before `hello`; send hello first on every connection", request.op()),
            ));
        }
        match request {
            Request::Stats(_) => self.stats().await.map(Reply::Stats),
            Request::AttachMailbox(_) => self.attach_mailbox(),
            Request::Ring(_) => Ok(Reply::Ring(Done {})),
            Request::RegisterInstance(r) => self.register_instance(r.instance, &r.namespace).await,
            Request::RegisterMemory(r) => self.register_memory(r),
            Request::Lookup(r) => self.lookup(r).await,
            Request::Save(r) => self.save(frame.request_id, r),
            Request::Load(r) => {
                let ids = match r.block_ids_packed {
                    Some(_) if !r.block_ids.is_empty() => {
                        return Err(Failure(
                            ErrorCode::BadRequest,
                            "send block_ids either as a list or packed, not both".into(),
                        ))
                    }
                    Some(bytes) => protocol::unpack_u32s(&bytes).map_err(|e| Failure(ErrorCode::BadRequest, e))?,
                    None => r.block_ids,
                };
                self.load(frame.request_id, r.lease, ids, r.layerwise).await
            }
            Request::Release(r) => self.release(r.lease).await,
            other => Err(Failure(ErrorCode::UnknownOp, format!("`{}` is not served by this server", other.op()))),
        }
    }

    fn hello(&self, version: u32) -> Result<Reply, Failure> {
        if version != u32::from(PROTOCOL_VERSION) {
            return Err(Failure(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client speaks protocol {version} but this server speaks {PROTOCOL_VERSION}; install matching kvloft versions"
                ),
            ));
        }
        self.state.borrow_mut().greeted = true;
        Ok(Reply::Hello(HelloReply {
            protocol: u32::from(PROTOCOL_VERSION),
            server_version: env!("CARGO_PKG_VERSION").into(),
            shards: self.ctx.shard_count() as u32,
            pid: std::process::id(),
        }))
    }

    fn instance(&self) -> Result<Instance, Failure> {
        self.state
            .borrow()
            .instance
            .clone()
            .ok_or_else(|| Failure(ErrorCode::NotRegistered, "send register_instance on this connection first".into()))
    }

    /// A trace of GPU request `op` of `blocks` blocks from the frame being answered (`None` for
    /// CPU memory or with tracing off); the connection keeps a handle to mark its `queued` reply.
    fn begin_trace(&self, op: &'static str, blocks: usize, mem: &EngineMemory) -> trace::Trace {
        if !matches!(mem, EngineMemory::Cuda(_)) {
            return None;
        }
        let t = trace::begin(op, blocks, self.frame_at.get());
        *self.trace.borrow_mut() = t.clone();
        t
    }

    /// A copy's completion was written: `spin_read` polls for `[server] spin-us` from now, and
    /// one fewer copy it watches through, if this one was (`watched`).
    fn copy_answered(&self, watched: bool) {
        self.answered_at.set(Instant::now());
        self.copies.set(self.copies.get() - u32::from(watched));
    }

    /// Whether this connection registered KV memory on a GPU.
    fn on_gpu(&self) -> bool {
        matches!(self.state.borrow().memory, Some((_, EngineMemory::Cuda(_))))
    }

    fn memory(&self) -> Result<(u32, EngineMemory), Failure> {
        self.state.borrow().memory.clone().ok_or_else(|| {
            Failure(ErrorCode::NoMemory, "only a worker that sent register_memory can save and load".into())
        })
    }

    async fn register_instance(&self, name: String, spec: &protocol::NamespaceSpec) -> Result<Reply, Failure> {
        if self.state.borrow().instance.is_some() {
            return Err(Failure(ErrorCode::AlreadyRegistered, "this connection already registered an instance".into()));
        }
        if name.is_empty() || name.len() > MAX_INSTANCE_BYTES {
            return Err(Failure(
                ErrorCode::BadRequest,
                format!("instance id must be 1 to {MAX_INSTANCE_BYTES} bytes, got {}", name.len()),
            ));
        }
        let ns = NamespaceId::of(spec).map_err(|e| Failure(ErrorCode::BadRequest, e.to_string()))?;
        let ranks = spec.tp_size * spec.pp_size;
        let home = self.ctx.instance_home(&name);
        let join = name.clone();
        self.ctx.ask(home, |reply| MeshMsg::Instance(InstanceOp::Join { name: join, ns, reply })).await??;
        self.state.borrow_mut().instance = Some(Instance { name, ns, ranks });
        Ok(Reply::RegisterInstance(RegisterInstanceReply { namespace_id: ns.to_hex(), slices_per_block: ranks }))
    }

    fn register_memory(&self, r: protocol::RegisterMemory) -> Result<Reply, Failure> {
        let protocol::RegisterMemory { rank, device, layers, gpu_uuid, ipc } = r;
        let instance = self.instance()?;
        if self.state.borrow().memory.is_some() {
            return Err(Failure(ErrorCode::AlreadyRegistered, "this connection already registered its memory".into()));
        }
        if rank >= instance.ranks {
            return Err(Failure(
                ErrorCode::Mismatch,
                format!("rank {rank} is outside the instance's {} ranks (tp_size * pp_size)", instance.ranks),
            ));
        }
        if layers.is_empty() {
            return Err(Failure(ErrorCode::BadRequest, "register_memory needs at least one layer".into()));
        }
        if layers.len() > MAX_LAYERS {
            return Err(Failure(
                ErrorCode::TooLarge,
                format!("at most {MAX_LAYERS} layers per registration, got {}", layers.len()),
            ));
        }
        let mem = if device == "cpu" {
            let mem =
                HostMemory::new(self.peer.pid, layers).map_err(|e| Failure(ErrorCode::BadRequest, e.to_string()))?;
            EngineMemory::Host(Arc::new(mem))
        } else if device.starts_with("cuda") {
            let uuid: [u8; 16] =
                gpu_uuid.as_deref().and_then(|u| <[u8; 16]>::try_from(u.as_slice()).ok()).ok_or_else(|| {
                    Failure(
                        ErrorCode::BadRequest,
                        format!("device {device:?} needs `gpu_uuid`: the GPU's 16-byte UUID"),
                    )
                })?;
            if !kvloft_gpu::cuda::driver_present() {
                return Err(Failure(
                    ErrorCode::BadRequest,
                    "this server has no CUDA driver: register \"cpu\" memory, or run kvloft on the GPU's machine"
                        .into(),
                ));
            }
            let ipc: Vec<(Vec<u8>, u64)> = ipc.into_iter().map(|r| (r.handle.into_vec(), r.offset)).collect();
            let mem = kvloft_gpu::cuda::CudaMemory::open(&uuid, layers, &ipc)
                .map_err(|e| Failure(ErrorCode::BadRequest, format!("GPU memory: {e}")))?;
            EngineMemory::Cuda(Arc::new(mem))
        } else {
            return Err(Failure(
                ErrorCode::BadRequest,
                format!("device {device:?} is unknown; use \"cpu\" or \"cuda:N\""),
            ));
        };
        let slice_bytes = mem.slice_bytes();
        let smallest_shard = (0..self.ctx.shard_count()).map(|s| self.ctx.shared.topology.shard_pool_bytes(s)).min();
        if smallest_shard.is_some_and(|b| slice_bytes > b) {
            return Err(Failure(
                ErrorCode::TooLarge,
                format!("a slice of {slice_bytes} bytes does not fit a shard's pool; raise the pool size"),
            ));
        }
        self.state.borrow_mut().memory = Some((rank, mem));
        Ok(Reply::RegisterMemory(RegisterMemoryReply { slice_bytes }))
    }

    async fn lookup(&self, request: protocol::Lookup) -> Result<Reply, Failure> {
        let instance = self.instance()?;
        match &request.packed {
            None => self.lookup_keys(instance, store::LookupKeys::List(block_hashes(request.hashes)?)).await,
            Some(_) if !request.hashes.is_empty() => {
                Err(Failure(ErrorCode::BadRequest, "send hashes either as a list or packed, not both".into()))
            }
            Some(packed) => {
                let keys = packed_keys(packed.hashes(), &packed.bytes, packed.hash_bytes as usize)?;
                self.lookup_keys(instance, store::LookupKeys::Packed(keys)).await
            }
        }
    }

    /// A packed lookup read in place from its frame ([`protocol::PackedLookupView`]): the same
    /// as [`Connection::lookup`] without first copying the hashes into an owned request.
    async fn lookup_packed(&self, view: protocol::PackedLookupView<'_>) -> Result<Reply, Failure> {
        let instance = self.instance()?;
        let keys = packed_keys(view.hashes(), view.bytes, view.hash_bytes as usize)?;
        self.lookup_keys(instance, store::LookupKeys::Packed(keys)).await
    }

    async fn lookup_keys(&self, instance: Instance, keys: store::LookupKeys<'_>) -> Result<Reply, Failure> {
        let store::LookupAnswer { hits, lease, pending } =
            store::lookup(&self.ctx, &instance.name, instance.ns, instance.ranks, keys, DEFAULT_LEASE_TTL_MS).await?;
        // Taken by `answer` once the reply is written; nothing awaits before that.
        *self.pending_pins.borrow_mut() = pending;
        if lease != 0 {
            let mut state = self.state.borrow_mut();
            if state.leases.len() >= MAX_LEASES_PER_CONNECTION {
                state.leases.remove(0);
            }
            state.leases.push(lease);
        }
        Ok(Reply::Lookup(LookupReply { hits, lease, lease_ttl_s: (DEFAULT_LEASE_TTL_MS / 1000) as u32 }))
    }

    fn save(self: &Rc<Self>, request_id: u64, request: protocol::Save) -> Result<Reply, Failure> {
        let instance = self.instance()?;
        let (rank, mem) = self.memory()?;
        let pairs: Vec<(&[u8], u32)> = match &request.packed {
            Some(_) if !request.blocks.is_empty() => {
                return Err(Failure(ErrorCode::BadRequest, "send blocks either as a list or packed, not both".into()))
            }
            Some(packed) => packed.blocks().map_err(|e| Failure(ErrorCode::BadRequest, e))?,
            None => request.blocks.iter().map(|b| (b.hash.as_slice(), b.block_id)).collect(),
        };
        if pairs.len() > MAX_BATCH_BLOCKS {
            return Err(too_many(pairs.len()));
        }
        let mut items = Vec::with_capacity(pairs.len());
        for (i, (hash, block_id)) in pairs.into_iter().enumerate() {
            mem.check_block(block_id).map_err(|e| Failure(ErrorCode::BlockOutOfRange, format!("block {i}: {e}")))?;
            items.push((block_hash(i, hash)?, block_id));
        }
        let after = match (&request.after_event, &request.layer_events) {
            (Some(_), Some(_)) => {
                return Err(Failure(
                    ErrorCode::BadRequest,
                    "send after_event or layer_events, not both (layer_events orders each layer)".into(),
                ))
            }
            (None, None) => SaveAfter::Nothing,
            (Some(handle), None) => SaveAfter::Event(self.ipc_event(&mem, "after_event", handle)?),
            (None, Some(handles)) => {
                let layers = match &mem {
                    EngineMemory::Cuda(cuda) => cuda.layers().len(),
                    EngineMemory::Host(_) => 0,
                };
                if layers > 0 && handles.len() != layers {
                    return Err(Failure(
                        ErrorCode::BadRequest,
                        format!(
                            "layer_events has {} handles but the registered memory has {layers} layers; send one per layer",
                            handles.len()
                        ),
                    ));
                }
                let mut events = Vec::with_capacity(handles.len());
                for h in handles {
                    events.push(self.ipc_event(&mem, "layer_events", h)?);
                }
                SaveAfter::Layers(events)
            }
        };
        let count = items.len() as u32;
        let conn = self.clone();
        let trace = self.begin_trace("save", items.len(), &mem);
        let watched = matches!(mem, EngineMemory::Cuda(_)) && matches!(after, SaveAfter::Nothing);
        self.copies.set(self.copies.get() + u32::from(watched));
        glommio::spawn_local(async move {
            trace::mark(&trace, "spawned");
            let (s, followup) = store::save(&conn.ctx, mem, instance.ns, rank, items, after, &trace).await;
            let done =
                Event::SaveDone(SaveDone { saved: s.saved, present: s.present, failed: s.failed, error: s.error });
            // The client hears first; the owners' seals are queued right after, and the
            // connection's next request waits until they are (`sealing`), so it reaches each
            // owner after them and finds what was just saved.
            conn.sealing.set(conn.sealing.get() + 1);
            conn.send(FrameKind::Event, request_id, &protocol::to_body(&done)).await;
            conn.copy_answered(watched);
            trace::mark(&trace, "answered");
            trace::report(&trace, conn.ctx.id);
            followup.send(&conn.ctx).await;
            conn.sealing.set(conn.sealing.get() - 1);
        })
        .detach();
        Ok(Reply::Save(Queued { blocks: count }))
    }

    /// The worker's CUDA event `handle` (sent in field `field`), opened on its GPU (once per
    /// connection and handle).
    fn ipc_event(
        &self,
        mem: &EngineMemory,
        field: &str,
        handle: &[u8],
    ) -> Result<Arc<kvloft_gpu::cuda::IpcEvent>, Failure> {
        let EngineMemory::Cuda(cuda) = mem else {
            return Err(Failure(ErrorCode::BadRequest, format!("{field} needs GPU memory (register \"cuda:N\")")));
        };
        let handle: [u8; 64] = handle.try_into().map_err(|_| {
            Failure(
                ErrorCode::BadRequest,
                format!("{field} holds 64-byte CUDA IPC event handles, got {} bytes", handle.len()),
            )
        })?;
        let mut state = self.state.borrow_mut();
        if let Some(e) = state.events.get(&handle) {
            return Ok(e.clone());
        }
        let event = kvloft_gpu::cuda::IpcEvent::open(cuda.device().clone(), &handle)
            .map_err(|e| Failure(ErrorCode::BadRequest, format!("{field}: {e}")))?;
        let event = Arc::new(event);
        if state.events.len() >= MAX_EVENTS_PER_CONNECTION {
            if let Some(old) = state.event_order.pop_front() {
                state.events.remove(&old);
            }
        }
        state.events.insert(handle, event.clone());
        state.event_order.push_back(handle);
        Ok(event)
    }

    /// This connection's per-layer load events for `cuda`, made on first use.
    fn layer_marks(
        &self,
        cuda: &kvloft_gpu::cuda::CudaMemory,
    ) -> Result<Vec<Arc<kvloft_gpu::cuda::SharedEvent>>, Failure> {
        let mut state = self.state.borrow_mut();
        let layers = cuda.layers().len();
        if state.layer_marks.len() != layers {
            let mut marks = Vec::with_capacity(layers);
            for _ in 0..layers {
                let e = kvloft_gpu::cuda::SharedEvent::new(cuda.device().clone())
                    .map_err(|e| Failure(ErrorCode::Internal, format!("creating a layer event: {e}")))?;
                marks.push(Arc::new(e));
            }
            state.layer_marks = marks;
        }
        Ok(state.layer_marks.clone())
    }

    async fn load(
        self: &Rc<Self>,
        request_id: u64,
        lease: u64,
        block_ids: Vec<u32>,
        layerwise: bool,
    ) -> Result<Reply, Failure> {
        let instance = self.instance()?;
        let (rank, mem) = self.memory()?;
        if block_ids.len() > MAX_BATCH_BLOCKS {
            return Err(too_many(block_ids.len()));
        }
        for (i, id) in block_ids.iter().enumerate() {
            mem.check_block(*id).map_err(|e| Failure(ErrorCode::BlockOutOfRange, format!("block {i}: {e}")))?;
        }
        let marks = match (&mem, layerwise) {
            (_, false) => None,
            (EngineMemory::Cuda(cuda), true) => Some(self.layer_marks(cuda)?),
            (EngineMemory::Host(_), true) => {
                return Err(Failure(
                    ErrorCode::BadRequest,
                    "layerwise loads need GPU memory (register \"cuda:N\"); CPU memory loads whole blocks".into(),
                ))
            }
        };
        let plan = store::load_prepare(&self.ctx, &instance.name, rank, lease, block_ids.len()).await?;
        let count = block_ids.len() as u32;
        let conn = self.clone();
        let layerwise = marks.map(|events| {
            let body = Event::LoadLayers(LoadLayers {
                events: events.iter().map(|e| BlockHashBytes::from(e.handle().to_vec())).collect(),
            });
            let conn = self.clone();
            let announce: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> = Box::pin(async move {
                conn.send(FrameKind::Event, request_id, &protocol::to_body(&body)).await;
            });
            Layerwise { events, announce }
        });
        let trace = self.begin_trace("load", block_ids.len(), &mem);
        let watched = matches!(mem, EngineMemory::Cuda(_)) && layerwise.is_none();
        self.copies.set(self.copies.get() + u32::from(watched));
        glommio::spawn_local(async move {
            trace::mark(&trace, "spawned");
            let (l, followup) = store::load_copy(&conn.ctx, mem, plan, block_ids, layerwise, &trace).await;
            let done = Event::LoadDone(LoadDone { loaded: l.loaded, error: l.error });
            conn.send(FrameKind::Event, request_id, &protocol::to_body(&done)).await;
            conn.copy_answered(watched);
            trace::mark(&trace, "answered");
            trace::report(&trace, conn.ctx.id);
            followup.send(&conn.ctx).await;
        })
        .detach();
        Ok(Reply::Load(Queued { blocks: count }))
    }

    async fn release(&self, lease: u64) -> Result<Reply, Failure> {
        let instance = self.instance()?;
        store::release(&self.ctx, &instance.name, lease).await?;
        self.state.borrow_mut().leases.retain(|l| *l != lease);
        Ok(Reply::Release(Done {}))
    }

    /// Releases every lease this connection took (their home is this shard) and leaves its
    /// instance.
    async fn close(&self) {
        let (leases, instance) = {
            let mut state = self.state.borrow_mut();
            (std::mem::take(&mut state.leases), state.instance.take())
        };
        for id in leases {
            self.ctx.lease_op(LeaseOp::Release { id, instance: None, reply: None });
        }
        if let Some(instance) = instance {
            let home = self.ctx.instance_home(&instance.name);
            self.ctx.tell(home, MeshMsg::Instance(InstanceOp::Leave { name: instance.name })).await;
        }
    }

    async fn stats(&self) -> Result<StatsReply, Failure> {
        let ctx = &self.ctx;
        let n = ctx.shard_count();
        let mut pending = Vec::with_capacity(n);
        for peer in (0..n).filter(|&p| p != ctx.id) {
            let (tx, rx) = flume::bounded(1);
            if ctx.mesh.send_to(peer, MeshMsg::Stats { reply: tx }).await.is_err() {
                return Err(Failure(ErrorCode::Internal, format!("shard {peer} has stopped")));
            }
            pending.push((peer, rx));
        }
        let mut shards = vec![ctx.stats()];
        for (peer, rx) in pending {
            match glommio::timer::timeout(SHARD_REPLY_TIMEOUT, async { Ok(rx.recv_async().await.ok()) }).await {
                Ok(Some(s)) => shards.push(s),
                _ => {
                    return Err(Failure(
                        ErrorCode::Internal,
                        format!("shard {peer} did not answer within {SHARD_REPLY_TIMEOUT:?}"),
                    ))
                }
            }
        }
        shards.sort_by_key(|s| s.id);
        let topology = &ctx.shared.topology;
        Ok(StatsReply {
            server_version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_s: ctx.shared.started.elapsed().as_secs_f64(),
            socket: topology.server.socket.display().to_string(),
            pool_bytes: shards.iter().map(|s| s.pool_bytes).sum(),
            shards,
        })
    }
}

fn too_many(n: usize) -> Failure {
    Failure(ErrorCode::TooLarge, format!("{n} blocks in one request; the limit is {MAX_BATCH_BLOCKS}: split the batch"))
}

fn block_hash(i: usize, bytes: &[u8]) -> Result<BlockHash, Failure> {
    let code = if bytes.len() > MAX_HASH_BYTES { ErrorCode::TooLarge } else { ErrorCode::BadRequest };
    BlockHash::try_from(bytes).map_err(|e| Failure(code, format!("hash {i}: {e}")))
}

fn block_hashes(hashes: Vec<protocol::BlockHashBytes>) -> Result<Vec<BlockHash>, Failure> {
    if hashes.len() > MAX_BATCH_BLOCKS {
        return Err(too_many(hashes.len()));
    }
    hashes.iter().enumerate().map(|(i, h)| block_hash(i, h)).collect()
}

/// Decodes a request body, telling an unknown operation from a malformed known one.
fn parse_request(body: &[u8]) -> Result<Request, Failure> {
    Request::decode(body).map_err(|e| {
        let code = match e {
            BodyError::UnknownOp(_) => ErrorCode::UnknownOp,
            _ => ErrorCode::BadRequest,
        };
        Failure(code, e.to_string())
    })
}

/// Sends `frame` on socket `fd` with descriptor `pass` attached (`SCM_RIGHTS`, which travels with
/// the first byte); returns the bytes sent.
fn send_fd(fd: RawFd, frame: &[u8], pass: RawFd) -> std::io::Result<usize> {
    let mut iov = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the fields set below point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of CMSG_SPACE(one fd), so the first header and its data
    // lie inside it; `iov`, `frame` and `control` outlive the sendmsg call.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), pass);
        let n = libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// A packed lookup's hashes, read where the frame holds them: `checked` is the wire type's own
/// check of `bytes` and `hash_bytes` (whose errors name the problem), and their count is bounded
/// by [`MAX_BATCH_BLOCKS`].
fn packed_keys<'a>(
    checked: Result<std::slice::ChunksExact<'a, u8>, String>,
    bytes: &'a [u8],
    hash_bytes: usize,
) -> Result<PackedKeys<'a>, Failure> {
    let chunks = checked.map_err(|e| Failure(ErrorCode::BadRequest, e))?;
    if chunks.len() > MAX_BATCH_BLOCKS {
        return Err(too_many(chunks.len()));
    }
    PackedKeys::new(bytes, hash_bytes).map_err(|e| Failure(ErrorCode::BadRequest, e.to_string()))
}
