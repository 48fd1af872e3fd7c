//! Protocol v1 over the Unix socket: framing and message types.
//!
//! A frame is a 4-byte little-endian length `L`, then `L` bytes: a 12-byte header and a
//! MessagePack body.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `L`, bytes after this field (header + body), at most [`MAX_FRAME_BYTES`] |
//! | 4 | 2 | magic `b"KL"` |
//! | 6 | 1 | header version, [`PROTOCOL_VERSION`] |
//! | 7 | 1 | kind: 1 request, 2 reply, 3 error, 4 event |
//! | 8 | 8 | request id, little-endian; replies and errors echo the request's |
//! | 16 | `L - 12` | body: a MessagePack map |
//!
//! Request and reply bodies carry their operation under the key `"op"`. Unknown keys in a body
//! are ignored, so a newer client may send optional fields an older server does not know.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks, in the header and in `hello`.
pub const PROTOCOL_VERSION: u8 = 1;
/// Frame magic.
pub const MAGIC: [u8; 2] = *b"KL";
/// Bytes of the length prefix.
pub const LEN_BYTES: usize = 4;
/// Bytes of the header after the length prefix.
pub const HEADER_BYTES: usize = 12;
/// Largest accepted `L` (header + body). A frame announcing more is refused and the connection
/// closed, since the stream position can no longer be trusted.
pub const MAX_FRAME_BYTES: usize = 16 << 20;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client to server.
    Request = 1,
    /// Server to client: the answer to the request with the same id.
    Reply = 2,
    /// Server to client: the request with the same id failed; the body is an [`ErrorReply`].
    Error = 3,
    /// Server to client: an asynchronous completion of the request with the same id.
    Event = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Request),
            2 => Some(Self::Reply),
            3 => Some(Self::Error),
            4 => Some(Self::Event),
            _ => None,
        }
    }
}

/// One decoded frame; the body is left as MessagePack bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Request, reply, error or event.
    pub kind: FrameKind,
    /// The request id (echoed by replies, errors and events).
    pub request_id: u64,
    /// MessagePack body.
    pub body: Vec<u8>,
}

/// Why bytes on the socket are not a valid frame. [`FrameError::is_fatal`] says whether the
/// connection can go on (the frame was skipped) or must be closed (the stream is out of step).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_BYTES`]; close the connection.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes; split the request")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The length prefix is smaller than a header; close the connection.
    #[error("frame length {len} is shorter than the {HEADER_BYTES}-byte header")]
    TooShort {
        /// Announced length.
        len: usize,
    },
    /// The magic bytes are wrong: the peer does not speak this protocol; close the connection.
    #[error("bad frame magic {found:#04x?}; the peer is not a kvloft client")]
    BadMagic {
        /// What was found instead of `KL`.
        found: [u8; 2],
    },
    /// The header version is not ours; the frame was skipped.
    #[error(
        "frame header version {found} is not supported (this server speaks {PROTOCOL_VERSION}); upgrade the older side"
    )]
    UnsupportedVersion {
        /// The version in the header.
        found: u8,
        /// Request id of the skipped frame, to address the error reply.
        request_id: u64,
    },
    /// The kind byte is unknown; the frame was skipped.
    #[error("unknown frame kind {found}")]
    UnknownKind {
        /// The kind byte.
        found: u8,
        /// Request id of the skipped frame.
        request_id: u64,
    },
}

impl FrameError {
    /// Whether the connection must be closed after reporting this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::TooShort { .. } | Self::BadMagic { .. })
    }

    /// The request id of the skipped frame, for non-fatal errors.
    pub fn request_id(&self) -> u64 {
        match self {
            Self::UnsupportedVersion { request_id, .. } | Self::UnknownKind { request_id, .. } => *request_id,
            _ => 0,
        }
    }
}

/// Decodes the first frame in `buf`. Returns `Ok(None)` while the frame is incomplete, and
/// otherwise the frame and how many bytes it used. A non-fatal error is only returned once the
/// whole frame is in `buf`: the caller drops [`LEN_BYTES`] + [`frame_len`] bytes and goes on.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    Ok(decode_ref(buf)?
        .map(|(f, used)| (Frame { kind: f.kind, request_id: f.request_id, body: f.body.to_vec() }, used)))
}

/// A frame whose body is borrowed from the buffer it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// Request, reply, error or event.
    pub kind: FrameKind,
    /// The request id (echoed by replies, errors and events).
    pub request_id: u64,
    /// MessagePack body.
    pub body: &'a [u8],
}

/// [`decode`] without copying the body: the frame borrows `buf`.
pub fn decode_ref(buf: &[u8]) -> Result<Option<(FrameRef<'_>, usize)>, FrameError> {
    let Some(len) = frame_len(buf)? else { return Ok(None) };
    let total = LEN_BYTES + len;
    if buf.len() < total {
        return Ok(None);
    }
    let h = &buf[LEN_BYTES..LEN_BYTES + HEADER_BYTES];
    let request_id = u64::from_le_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    if h[2] != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion { found: h[2], request_id });
    }
    let kind = FrameKind::from_u8(h[3]).ok_or(FrameError::UnknownKind { found: h[3], request_id })?;
    Ok(Some((FrameRef { kind, request_id, body: &buf[LEN_BYTES + HEADER_BYTES..total] }, total)))
}

/// `L`, the length after the prefix (header + body), of the first frame in `buf`, once its
/// prefix and magic have arrived; `Ok(None)` before that.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < LEN_BYTES {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len, max: MAX_FRAME_BYTES });
    }
    if len < HEADER_BYTES {
        return Err(FrameError::TooShort { len });
    }
    if buf.len() < LEN_BYTES + 2 {
        return Ok(None);
    }
    let magic = [buf[LEN_BYTES], buf[LEN_BYTES + 1]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    Ok(Some(len))
}

/// Appends one frame to `out`.
pub fn encode(out: &mut Vec<u8>, kind: FrameKind, request_id: u64, body: &[u8]) {
    let len = (HEADER_BYTES + body.len()) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(body);
}

/// Appends a `lookup` request frame whose hashes are packed: the bytes `encode` would write for
/// `to_body(&Request::Lookup(Lookup { hashes: vec![], packed: Some(..) }))`, without building the
/// request first, so each hash is copied once, straight into `out`. `None` (and `out` unchanged)
/// unless every hash has one length of 1 to [`MAX_HASH_BYTES`] bytes; send the list form then.
pub fn encode_packed_lookup<'a, I>(out: &mut Vec<u8>, request_id: u64, hashes: I) -> Option<()>
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: ExactSizeIterator,
{
    // One pass over the hashes: the header takes the first hash's length, each hash is checked
    // as it is copied, and a mismatch takes everything written back out.
    let mut hashes = hashes.into_iter().peekable();
    let count = hashes.len();
    let hash_bytes = hashes.peek().map_or(0, |h| h.len());
    if !(1..=MAX_HASH_BYTES).contains(&hash_bytes) {
        return None;
    }
    let start = out.len();
    out.reserve(64 + count * hash_bytes);
    out.extend_from_slice(&[0; LEN_BYTES]);
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(FrameKind::Request as u8);
    out.extend_from_slice(&request_id.to_le_bytes());
    // Writing MessagePack into a Vec cannot fail.
    let _ = (|| -> Result<(), rmp::encode::ValueWriteError> {
        rmp::encode::write_map_len(out, 3)?;
        rmp::encode::write_str(out, "op")?;
        rmp::encode::write_str(out, "lookup")?;
        rmp::encode::write_str(out, "hashes")?;
        rmp::encode::write_array_len(out, 0)?;
        rmp::encode::write_str(out, "packed")?;
        rmp::encode::write_map_len(out, 2)?;
        rmp::encode::write_str(out, "hash_bytes")?;
        rmp::encode::write_uint(out, hash_bytes as u64)?;
        rmp::encode::write_str(out, "bytes")?;
        rmp::encode::write_bin_len(out, (count * hash_bytes) as u32)?;
        Ok(())
    })();
    let data = out.len();
    out.resize(data + count * hash_bytes, 0);
    let slots = out[data..].chunks_exact_mut(hash_bytes);
    let copied = if hash_bytes == MAX_HASH_BYTES {
        // The usual 32-byte hashes, copied as fixed-size arrays: no call per hash.
        slots.zip(hashes).all(|(slot, h)| {
            match (<&mut [u8; MAX_HASH_BYTES]>::try_from(slot), <&[u8; MAX_HASH_BYTES]>::try_from(h)) {
                (Ok(slot), Ok(h)) => {
                    *slot = *h;
                    true
                }
                _ => false,
            }
        })
    } else {
        slots.zip(hashes).all(|(slot, h)| {
            h.len() == hash_bytes && {
                slot.copy_from_slice(h);
                true
            }
        })
    };
    if !copied {
        out.truncate(start);
        return None;
    }
    let len = (out.len() - start - LEN_BYTES) as u32;
    out[start..start + LEN_BYTES].copy_from_slice(&len.to_le_bytes());
    Some(())
}

/// A packed `lookup` body read in place: the hashes stay where the frame holds them, with no
/// owned request built around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedLookupView<'a> {
    /// Bytes per hash, as sent (checked by [`PackedLookupView::hashes`]).
    pub hash_bytes: u64,
    /// The hashes back to back.
    pub bytes: &'a [u8],
}

impl<'a> PackedLookupView<'a> {
    /// Reads `body` when it is exactly the packed lookup [`encode_packed_lookup`] writes: the map
    /// `{"op": "lookup", "hashes": [], "packed": {"hash_bytes": N, "bytes": BIN}}` with its keys in
    /// that order and nothing after it. `None` for any other body, which then takes the general
    /// decoder ([`Request::decode`]), so this is only a shortcut, never a second dialect.
    pub fn parse(body: &'a [u8]) -> Option<Self> {
        fn key(rd: &mut &[u8], want: &str) -> Option<()> {
            let len = rmp::decode::read_str_len(rd).ok()? as usize;
            let (name, rest) = rd.split_at_checked(len)?;
            *rd = rest;
            (name == want.as_bytes()).then_some(())
        }
        let mut rd: &[u8] = body;
        if rmp::decode::read_map_len(&mut rd).ok()? != 3 {
            return None;
        }
        key(&mut rd, "op")?;
        key(&mut rd, "lookup")?;
        key(&mut rd, "hashes")?;
        if rmp::decode::read_array_len(&mut rd).ok()? != 0 {
            return None;
        }
        key(&mut rd, "packed")?;
        if rmp::decode::read_map_len(&mut rd).ok()? != 2 {
            return None;
        }
        key(&mut rd, "hash_bytes")?;
        let hash_bytes: u64 = rmp::decode::read_int(&mut rd).ok()?;
        key(&mut rd, "bytes")?;
        let len = rmp::decode::read_bin_len(&mut rd).ok()? as usize;
        (rd.len() == len).then_some(Self { hash_bytes, bytes: rd })
    }

    /// The hashes, each `hash_bytes` long; fails, naming the problem, on a length of 0 or over
    /// [`MAX_HASH_BYTES`] or bytes that are not a whole number of hashes (as
    /// [`PackedHashes::hashes`]).
    pub fn hashes(&self) -> Result<std::slice::ChunksExact<'a, u8>, String> {
        let n = self.hash_bytes as usize;
        if !(1..=MAX_HASH_BYTES as u64).contains(&self.hash_bytes) {
            return Err(format!("packed hash_bytes is {}; it must be 1 to {MAX_HASH_BYTES}", self.hash_bytes));
        }
        if self.bytes.len() % n != 0 {
            return Err(format!("{} packed bytes are not a whole number of {n}-byte hashes", self.bytes.len()));
        }
        Ok(self.bytes.chunks_exact(n))
    }
}

/// Serialises a message body as a MessagePack map with field names.
pub fn to_body<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs into a Vec cannot fail.
    rmp_serde::to_vec_named(value).unwrap_or_default()
}

/// Deserialises a message body.
pub fn from_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(body)
}

/// Most blocks (or hashes) one `lookup`, `save` or `load` may carry; split larger batches.
pub const MAX_BATCH_BLOCKS: usize = 65_536;
/// Most layers one `register_memory` may describe.
pub const MAX_LAYERS: usize = 4_096;
/// Longest block hash, in bytes (vLLM's SHA-256 block hashes are 32).
pub const MAX_HASH_BYTES: usize = 32;

/// A client request body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// First request on every connection: agree on the protocol version.
    Hello(Hello),
    /// Join an inference instance and its namespace (the fingerprint of everything that changes a
    /// block's bytes). Every connection of an engine (scheduler and each worker) sends it once.
    RegisterInstance(RegisterInstance),
    /// A worker hands over where its KV cache lives; the connection becomes that rank's.
    RegisterMemory(RegisterMemory),
    /// How many leading hashes are stored, and a lease that pins them until loaded or released.
    Lookup(Lookup),
    /// Copy the named engine blocks of this rank into the store; completion comes as a
    /// `save_done` event.
    Save(Save),
    /// Copy a lease's blocks into the named engine blocks of this rank; completion comes as a
    /// `load_done` event.
    Load(Load),
    /// Give up a lease without loading (the rest of) it.
    Release(Release),
    /// Server figures: shards, pinning, uptime, pool and index.
    Stats(StatsRequest),
    /// Make this connection a mailbox: shared memory that carries one request and its reply
    /// without the socket. The reply's frame carries the memory's descriptor (`SCM_RIGHTS`).
    AttachMailbox(AttachMailbox),
    /// Serve the request waiting in this connection's mailbox (the server was not polling it),
    /// then answer this one.
    Ring(Ring),
}

/// Why a request body did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is not a MessagePack map with a string `"op"`; fix the client.
    #[error("the body is not a MessagePack map with an \"op\" key: {0}")]
    NoOp(String),
    /// The operation is not one this build serves; upgrade the server or drop the call.
    #[error("unknown operation {0:?}; this server knows {ops}", ops = Request::OPS.join(", "))]
    UnknownOp(String),
    /// A known operation with missing or mistyped fields; fix the client.
    #[error("malformed `{op}` request: {message}")]
    Malformed {
        /// The operation.
        op: &'static str,
        /// What the decoder said.
        message: String,
    },
}

impl Request {
    /// Decodes a request body. Reads `"op"` first, then decodes the operation's own struct
    /// straight from the body: the generic internally tagged path would first copy the whole body
    /// (1,024 hashes of a lookup, say) into an intermediate tree.
    pub fn decode(body: &[u8]) -> Result<Request, BodyError> {
        #[derive(Deserialize)]
        struct OpOnly {
            op: String,
        }
        fn fields<'a, T: Deserialize<'a>>(op: &'static str, body: &'a [u8]) -> Result<T, BodyError> {
            from_body(body).map_err(|e| BodyError::Malformed { op, message: e.to_string() })
        }
        let OpOnly { op } = from_body(body).map_err(|e| BodyError::NoOp(e.to_string()))?;
        Ok(match op.as_str() {
            "hello" => Self::Hello(fields("hello", body)?),
            "register_instance" => Self::RegisterInstance(fields("register_instance", body)?),
            "register_memory" => Self::RegisterMemory(fields("register_memory", body)?),
            "lookup" => Self::Lookup(fields("lookup", body)?),
            "save" => Self::Save(fields("save", body)?),
            "load" => Self::Load(fields("load", body)?),
            "release" => Self::Release(fields("release", body)?),
            "stats" => Self::Stats(fields("stats", body)?),
            "attach_mailbox" => Self::AttachMailbox(fields("attach_mailbox", body)?),
            "ring" => Self::Ring(fields("ring", body)?),
            _ => return Err(BodyError::UnknownOp(op)),
        })
    }

    /// Every operation name this build serves, as on the wire.
    pub const OPS: &'static [&'static str] = &[
        "hello",
        "register_instance",
        "register_memory",
        "lookup",
        "save",
        "load",
        "release",
        "stats",
        "attach_mailbox",
        "ring",
    ];

    /// The operation name, as on the wire.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::RegisterInstance(_) => "register_instance",
            Self::RegisterMemory(_) => "register_memory",
            Self::Lookup(_) => "lookup",
            Self::Save(_) => "save",
            Self::Load(_) => "load",
            Self::Release(_) => "release",
            Self::Stats(_) => "stats",
            Self::AttachMailbox(_) => "attach_mailbox",
            Self::Ring(_) => "ring",
        }
    }
}

/// Everything that changes the bytes of a block. Two engines whose namespaces are equal share
/// blocks; any difference is a miss.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NamespaceSpec {
    /// Model identity (name or path, plus revision where known).
    pub model: String,
    /// Model dtype (`bfloat16`).
    pub dtype: String,
    /// KV-cache dtype (`auto`, `fp8_e4m3`).
    pub kv_dtype: String,
    /// Attention layers whose KV is stored.
    pub num_layers: u32,
    /// KV heads per layer (over all TP ranks).
    pub num_kv_heads: u32,
    /// Head size.
    pub head_size: u32,
    /// Tokens per block.
    pub block_size: u32,
    /// Attention layout: `nhd`, `hnd`, `mla`, `cross_layer`.
    pub layout: String,
    /// Tensor-parallel size.
    pub tp_size: u32,
    /// Pipeline-parallel size.
    pub pp_size: u32,
    /// Hybrid-attention group id (0 for plain models).
    #[serde(default)]
    pub group: u32,
    /// Anything else that changes a block's bytes and the fields above do not name: the engine's
    /// physical cache layout, the attention backend, the block's shape. Empty (the default) for
    /// none; hashed into the namespace id only when set, so ids without one are unchanged.
    #[serde(default)]
    pub variant: String,
}

/// `register_instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterInstance {
    /// Id shared by every process of one inference engine (its engine id).
    pub instance: String,
    /// The instance's namespace.
    pub namespace: NamespaceSpec,
}

/// Answer to `register_instance`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterInstanceReply {
    /// The namespace id, 32 hex digits, stable across processes, hosts and restarts.
    pub namespace_id: String,
    /// Slices per block: `tp_size * pp_size`; a block is visible once all are written.
    pub slices_per_block: u32,
}

/// Where one layer's KV blocks live in the worker's memory. Segment `s` of engine block `b`
/// starts at `base + b * block_stride + s * segment_stride` and is `segment_bytes` long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMemory {
    /// Address of block 0, segment 0, in the worker's address space.
    pub base: u64,
    /// Engine blocks in this layer's cache.
    pub num_blocks: u32,
    /// Bytes from one block to the next.
    pub block_stride: u64,
    /// Segments per block: 2 for split K/V, 1 for MLA or cross-layer blocks.
    pub segments: u32,
    /// Bytes from one segment to the next (ignored with one segment).
    pub segment_stride: u64,
    /// Bytes of one segment of one block.
    pub segment_bytes: u64,
}

/// `register_memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterMemory {
    /// This worker's rank in the instance: `pp_rank * tp_size + tp_rank`.
    pub rank: u32,
    /// Where the memory is: `cpu` (the host backend reads it from this process) or `cuda:N`.
    pub device: String,
    /// One entry per layer, in layer order.
    pub layers: Vec<LayerMemory>,
    /// With `cuda:N`: the GPU's UUID (16 bytes), which names it whatever the client's
    /// `CUDA_VISIBLE_DEVICES`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_uuid: Option<serde_bytes::ByteBuf>,
    /// With `cuda:N`: one entry per layer, where its memory is. A layer's `base` is then an
    /// offset into the allocation its handle names (not an address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipc: Vec<IpcRegion>,
}

/// A GPU allocation shared by CUDA IPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcRegion {
    /// The 64-byte `cudaIpcMemHandle_t` of the allocation (torch: `_share_cuda_()[1]`).
    pub handle: serde_bytes::ByteBuf,
    /// Bytes from the allocation's start to the layer's block 0, segment 0 (torch: the storage's
    /// offset plus the tensor's storage offset in bytes).
    pub offset: u64,
}

/// Answer to `register_memory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterMemoryReply {
    /// Bytes of this rank's slice of one block (all layers, all segments).
    pub slice_bytes: u64,
}

/// A block hash as the engine computed it (vLLM's `request.block_hashes`), 1 to 32 bytes.
pub type BlockHashBytes = serde_bytes::ByteBuf;

/// `lookup`: block hashes of a prompt in prefix order, as a list or packed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Lookup {
    /// Chained block hashes, first block first.
    #[serde(default)]
    pub hashes: Vec<BlockHashBytes>,
    /// The same hashes as one byte string, all of one length, back to back: far cheaper to encode
    /// and decode than a list of 1,024 byte strings. When set, `hashes` must be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<PackedHashes>,
}

/// Hashes of one length stored back to back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedHashes {
    /// Bytes per hash, 1 to [`MAX_HASH_BYTES`].
    pub hash_bytes: u32,
    /// `count * hash_bytes` bytes.
    pub bytes: BlockHashBytes,
}

impl PackedHashes {
    /// Packs `hashes` when they all have one length of 1 to [`MAX_HASH_BYTES`] bytes.
    pub fn pack<'a>(hashes: impl IntoIterator<Item = &'a [u8]>) -> Option<Self> {
        let mut bytes = Vec::new();
        let mut len = None;
        for h in hashes {
            match len {
                None => len = Some(h.len()),
                Some(l) if l != h.len() => return None,
                Some(_) => {}
            }
            bytes.extend_from_slice(h);
        }
        let len = len.filter(|l| (1..=MAX_HASH_BYTES).contains(l))?;
        Some(Self { hash_bytes: len as u32, bytes: BlockHashBytes::from(bytes) })
    }

    /// The hashes, or why the packing is invalid.
    pub fn hashes(&self) -> Result<std::slice::ChunksExact<'_, u8>, String> {
        let n = self.hash_bytes as usize;
        if !(1..=MAX_HASH_BYTES).contains(&n) {
            return Err(format!("packed hash_bytes is {n}; it must be 1 to {MAX_HASH_BYTES}"));
        }
        if self.bytes.len() % n != 0 {
            return Err(format!("{} packed bytes are not a whole number of {n}-byte hashes", self.bytes.len()));
        }
        Ok(self.bytes.chunks_exact(n))
    }
}

/// Answer to `lookup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReply {
    /// Leading hashes whose every slice is stored.
    pub hits: u32,
    /// Pins those hits until every rank loaded them, `release`, or expiry; 0 when `hits` is 0.
    pub lease: u64,
    /// Seconds the lease stays valid.
    pub lease_ttl_s: u32,
}

/// One block to save: its hash and the engine block that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveBlock {
    /// Block hash.
    pub hash: BlockHashBytes,
    /// Engine block id in the registered memory.
    pub block_id: u32,
}

/// `save`: this rank's slices of these blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Save {
    /// Blocks to save.
    #[serde(default)]
    pub blocks: Vec<SaveBlock>,
    /// The same blocks packed, used instead of `blocks`: far cheaper to encode and decode for
    /// thousands of blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed: Option<PackedSave>,
    /// With GPU memory: the 64-byte CUDA IPC handle of an event the worker recorded after the
    /// kernels that wrote these blocks; the copy waits for it on the GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_event: Option<BlockHashBytes>,
    /// With GPU memory, instead of `after_event`: one 64-byte CUDA IPC event handle per layer,
    /// each recorded after the kernels that wrote that layer; the copy of layer `i` waits for
    /// event `i` on the GPU, so early layers are saved while later ones are still computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_events: Option<Vec<BlockHashBytes>>,
}

/// `save` blocks packed: `count` hashes of `hash_bytes` bytes back to back, and `count` engine
/// block ids as little-endian `u32`s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedSave {
    /// Bytes per hash, 1 to [`MAX_HASH_BYTES`].
    pub hash_bytes: u32,
    /// The hashes.
    pub hashes: BlockHashBytes,
    /// The engine block ids, 4 bytes each, little-endian.
    pub block_ids: BlockHashBytes,
}

impl PackedSave {
    /// Packs `(hash, block id)` pairs when every hash has one length of 1 to [`MAX_HASH_BYTES`].
    pub fn pack<'a>(blocks: impl IntoIterator<Item = (&'a [u8], u32)>) -> Option<Self> {
        let (mut hashes, mut ids, mut len) = (Vec::new(), Vec::new(), None);
        for (h, id) in blocks {
            match len {
                None => len = Some(h.len()),
                Some(l) if l != h.len() => return None,
                Some(_) => {}
            }
            hashes.extend_from_slice(h);
            ids.extend_from_slice(&id.to_le_bytes());
        }
        let len = len.filter(|l| (1..=MAX_HASH_BYTES).contains(l))?;
        Some(Self {
            hash_bytes: len as u32,
            hashes: BlockHashBytes::from(hashes),
            block_ids: BlockHashBytes::from(ids),
        })
    }

    /// The `(hash, block id)` pairs, or why the packing is invalid.
    pub fn blocks(&self) -> Result<Vec<(&[u8], u32)>, String> {
        let n = self.hash_bytes as usize;
        if !(1..=MAX_HASH_BYTES).contains(&n) {
            return Err(format!("packed hash_bytes is {n}; it must be 1 to {MAX_HASH_BYTES}"));
        }
        if self.hashes.len() % n != 0 {
            return Err(format!("{} packed hash bytes are not a whole number of {n}-byte hashes", self.hashes.len()));
        }
        let ids = unpack_u32s(&self.block_ids)?;
        if ids.len() * n != self.hashes.len() {
            return Err(format!("{} packed hashes but {} block ids", self.hashes.len() / n, ids.len()));
        }
        Ok(self.hashes.chunks_exact(n).zip(ids).collect())
    }
}

/// Little-endian `u32`s from `bytes`, or why `bytes` is not a whole number of them.
pub fn unpack_u32s(bytes: &[u8]) -> Result<Vec<u32>, String> {
    if bytes.len() % 4 != 0 {
        return Err(format!("{} packed block-id bytes are not a whole number of 4-byte ids", bytes.len()));
    }
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Answer to `save` or `load`: the work is queued; an event reports completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Queued {
    /// Blocks accepted.
    pub blocks: u32,
}

/// `load`: copy the lease's first `block_ids.len()` hits into these engine blocks, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// The lease from `lookup`.
    pub lease: u64,
    /// Destination engine block per hit.
    #[serde(default)]
    pub block_ids: Vec<u32>,
    /// The same ids as little-endian `u32`s back to back, used instead of `block_ids`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_ids_packed: Option<BlockHashBytes>,
    /// With GPU memory: copy layer by layer and send a `load_layers` event (one CUDA IPC event
    /// handle per layer, recorded after that layer's copy) as soon as every layer's copy is
    /// queued, before `load_done`; the worker's stream waits on event `i` before layer `i`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub layerwise: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// The lease to give up.
    pub lease: u64,
}

/// Answer to `release` and to registrations that return nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Done {}

/// An asynchronous completion, sent in an event frame with the request's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A `save` finished.
    SaveDone(SaveDone),
    /// A `load` finished.
    LoadDone(LoadDone),
    /// A `layerwise` load has queued every layer's copy: wait on these events.
    LoadLayers(LoadLayers),
}

/// The events of a `layerwise` load, sent once all its copies are queued and before its
/// `load_done`: one 64-byte CUDA IPC event handle per layer, recorded after that layer's copy.
/// A connection's layerwise loads reuse the same events (open each handle once); a wait issued
/// after this event arrived covers this load's layer. A load that fails before its copies are
/// queued sends no `load_layers`, only a `load_done` with the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadLayers {
    /// One handle per layer, in layer order.
    pub events: Vec<BlockHashBytes>,
}

/// A `save` finished: how many slices were written, already present, or failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveDone {
    /// Slices copied into the store.
    pub saved: u32,
    /// Slices the store already had (nothing copied).
    pub present: u32,
    /// Slices not saved (pool full, copy failed); the engine keeps serving without them.
    pub failed: u32,
    /// Why some failed.
    pub error: Option<String>,
}

/// A `load` finished. With `error`, none of the destination blocks may be used: recompute them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadDone {
    /// Blocks copied into the engine's memory.
    pub loaded: u32,
    /// Why the load failed; `None` on success.
    pub error: Option<String>,
}

/// `hello`: the client's protocol version and who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the client speaks.
    pub protocol: u32,
    /// Free-form client name for logs (`kvloft-cli`, `vllm-worker-0`).
    #[serde(default)]
    pub client: String,
    /// The client's process id.
    #[serde(default)]
    pub pid: u32,
}

/// `stats`: no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatsRequest {}

/// `attach_mailbox`: no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AttachMailbox {}

/// `ring`: no arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ring {}

/// Answer to `attach_mailbox`; its frame carries the mailbox's descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxReply {
    /// Bytes of the shared memory.
    pub bytes: u64,
    /// Largest request frame it carries.
    pub request_bytes: u64,
    /// Largest reply frame it carries.
    pub reply_bytes: u64,
}

/// A reply body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reply {
    /// Answer to `hello`.
    Hello(HelloReply),
    /// Answer to `register_instance`.
    RegisterInstance(RegisterInstanceReply),
    /// Answer to `register_memory`.
    RegisterMemory(RegisterMemoryReply),
    /// Answer to `lookup`.
    Lookup(LookupReply),
    /// Answer to `save`; a `save_done` event follows.
    Save(Queued),
    /// Answer to `load`; a `load_done` event follows.
    Load(Queued),
    /// Answer to `release`.
    Release(Done),
    /// Answer to `stats`.
    Stats(StatsReply),
    /// Answer to `attach_mailbox`.
    AttachMailbox(MailboxReply),
    /// Answer to `ring`, after the mailbox's reply was written.
    Ring(Done),
}

/// Answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Protocol version the server speaks.
    pub protocol: u32,
    /// kvloft version (`CARGO_PKG_VERSION`).
    pub server_version: String,
    /// Number of shards.
    pub shards: u32,
    /// Server process id: a worker grants it access to its memory (PR_SET_PTRACER) for the host
    /// backend.
    #[serde(default)]
    pub pid: u32,
}

/// Answer to `stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// kvloft version.
    pub server_version: String,
    /// Server process id.
    pub pid: u32,
    /// Seconds since the server started.
    pub uptime_s: f64,
    /// The socket this server listens on.
    pub socket: String,
    /// Configured pinned pool size over all shards, in bytes.
    pub pool_bytes: u64,
    /// One entry per shard, by shard id.
    pub shards: Vec<ShardStats>,
}

/// One shard's figures, reported by the shard itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStats {
    /// Shard id.
    pub id: u32,
    /// CPU the shard was configured to run on.
    pub cpu: u32,
    /// NUMA node of that CPU.
    pub numa_node: u32,
    /// GPU index the shard drives.
    pub gpu: Option<u32>,
    /// Network device the shard uses.
    pub nic: Option<String>,
    /// NVMe tier directory.
    pub ssd: Option<String>,
    /// This shard's slice of the pinned pool, in bytes.
    pub pool_bytes: u64,
    /// Kernel thread id of the executor (`/proc/<pid>/task/<tid>`).
    pub thread_id: i32,
    /// CPUs the executor thread may run on, read from the kernel by the thread itself.
    pub allowed_cpus: Vec<u32>,
    /// Client connections this shard serves now.
    pub connections: u64,
    /// Requests this shard has answered since start.
    pub requests: u64,
    /// Slices stored (sealed) in this shard's pool.
    #[serde(default)]
    pub slices: u64,
    /// Pool bytes in use (slots of stored and in-flight slices).
    #[serde(default)]
    pub used_bytes: u64,
    /// Hashes looked up on this shard that were found, over all ranks.
    #[serde(default)]
    pub hits: u64,
    /// Hashes looked up on this shard that were missing.
    #[serde(default)]
    pub misses: u64,
    /// Slices evicted to make room.
    #[serde(default)]
    pub evictions: u64,
    /// Slices saved.
    #[serde(default)]
    pub saves: u64,
    /// Slices loaded.
    #[serde(default)]
    pub loads: u64,
    /// Leases held on this shard.
    #[serde(default)]
    pub leases: u64,
}

/// Body of an error frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable cause.
    pub code: ErrorCode,
    /// What went wrong and how to fix it, for people.
    pub message: String,
}

/// Machine-readable error causes. Every one leaves the connection usable unless the text says
/// otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be read; the server closes the connection after this error when the
    /// stream is out of step (bad magic, bad length).
    BadFrame,
    /// Header or `hello` protocol version differs from the server's; upgrade the older side.
    UnsupportedVersion,
    /// The body is not valid MessagePack for the operation; fix the client.
    BadRequest,
    /// The `op` is not one this server knows; upgrade the server or drop the call.
    UnknownOp,
    /// A request came before `hello`; send `hello` first.
    HelloRequired,
    /// The request needs `register_instance` first on this connection.
    NotRegistered,
    /// The request needs `register_memory` first on this connection (only workers save and load).
    NoMemory,
    /// The connection already registered; open another connection for another instance or rank.
    AlreadyRegistered,
    /// Registrations of one instance disagree (namespace, slice size, rank out of range).
    Mismatch,
    /// An engine block id is outside the registered memory.
    BlockOutOfRange,
    /// The lease does not exist: it expired, was released or fully loaded. Look up again.
    UnknownLease,
    /// The lease belongs to another instance.
    LeaseNotOwned,
    /// A batch, hash or table exceeds its bound; the message names the limit.
    TooLarge,
    /// The server could not read or write the client's memory; the message says why (for the host
    /// backend: grant access with PR_SET_PTRACER, or run as the same user).
    MemoryAccess,
    /// The server is shutting down; reconnect later.
    ShuttingDown,
    /// The server failed internally; the message says where. Retry, then report it.
    Internal,
}

#[cfg(test)]
mod packed_view_tests {
    use super::*;

    fn body_of(frame: &[u8]) -> &[u8] {
        &frame[LEN_BYTES + HEADER_BYTES..]
    }

    #[test]
    fn the_view_reads_what_the_packed_encoder_writes() {
        for (count, n) in [(1usize, 32usize), (1024, 32), (3, 7), (300, 1)] {
            let hashes: Vec<Vec<u8>> = (0..count).map(|i| vec![(i % 251) as u8; n]).collect();
            let mut frame = Vec::new();
            encode_packed_lookup(&mut frame, 9, hashes.iter().map(Vec::as_slice)).unwrap();
            let view = PackedLookupView::parse(body_of(&frame)).expect("the encoder's layout");
            assert_eq!(view.hash_bytes, n as u64);
            let Request::Lookup(owned) = Request::decode(body_of(&frame)).unwrap() else { panic!("a lookup") };
            let packed = owned.packed.unwrap();
            assert_eq!(view.bytes, packed.bytes.as_slice());
            assert!(view.hashes().unwrap().eq(packed.hashes().unwrap()));
        }
    }

    #[test]
    fn other_bodies_take_the_general_decoder() {
        let hashes = [vec![1u8; 32], vec![2u8; 32]];
        let mut frame = Vec::new();
        encode_packed_lookup(&mut frame, 1, hashes.iter().map(Vec::as_slice)).unwrap();
        let body = body_of(&frame).to_vec();
        // Trailing or missing bytes, the list form, another operation, reordered keys.
        let mut longer = body.clone();
        longer.push(0);
        assert_eq!(PackedLookupView::parse(&longer), None);
        assert_eq!(PackedLookupView::parse(&body[..body.len() - 1]), None);
        let list = to_body(&Request::Lookup(Lookup {
            hashes: hashes.iter().cloned().map(BlockHashBytes::from).collect(),
            packed: None,
        }));
        assert_eq!(PackedLookupView::parse(&list), None);
        assert_eq!(PackedLookupView::parse(&to_body(&Request::Stats(StatsRequest {}))), None);
        #[derive(Serialize)]
        struct Reordered<'a> {
            op: &'a str,
            packed: PackedHashes,
            hashes: Vec<u8>,
        }
        let packed = PackedHashes::pack(hashes.iter().map(Vec::as_slice)).unwrap();
        let reordered = to_body(&Reordered { op: "lookup", packed, hashes: vec![] });
        assert_eq!(PackedLookupView::parse(&reordered), None);
        assert!(Request::decode(&reordered).is_ok(), "still a lookup for the general decoder");
        assert_eq!(PackedLookupView::parse(b""), None);
        // A bad hash length parses, and is refused where the hashes are read.
        let mut bad = Vec::new();
        encode_packed_lookup(&mut bad, 1, [&[5u8; 4][..], &[6u8; 4][..]]).unwrap();
        let mut body = body_of(&bad).to_vec();
        let at = body.windows(10).position(|w| w == b"hash_bytes").unwrap() + 10;
        body[at] = 3; // 8 bytes are not a whole number of 3-byte hashes
        let view = PackedLookupView::parse(&body).unwrap();
        assert!(view.hashes().unwrap_err().contains("whole number"));
        body[at] = 0;
        assert!(PackedLookupView::parse(&body).unwrap().hashes().unwrap_err().contains("1 to 32"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, id: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, kind, id, body);
        out
    }

    #[test]
    fn round_trip() {
        let body = to_body(&Request::Hello(Hello { protocol: 1, client: "t".into(), pid: 7 }));
        let bytes = frame(FrameKind::Request, 42, &body);
        let (f, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!((f.kind, f.request_id), (FrameKind::Request, 42));
        let req: Request = from_body(&f.body).unwrap();
        assert_eq!(req, Request::Hello(Hello { protocol: 1, client: "t".into(), pid: 7 }));
    }

    /// The direct lookup encoder writes what the generic path writes, and declines what must be
    /// sent as a list.
    #[test]
    fn packed_lookup_frame_equals_the_generic_encoding() {
        for (count, len) in [(1usize, 32usize), (3, 8), (1024, 32), (70_000, 1)] {
            let hashes: Vec<Vec<u8>> = (0..count).map(|i| (0..len).map(|b| (i * 31 + b) as u8).collect()).collect();
            let packed = PackedHashes::pack(hashes.iter().map(Vec::as_slice)).unwrap();
            let request = Request::Lookup(Lookup { hashes: vec![], packed: Some(packed) });
            let expect = frame(FrameKind::Request, 9, &to_body(&request));
            let mut out = b"before".to_vec();
            assert_eq!(encode_packed_lookup(&mut out, 9, hashes.iter().map(Vec::as_slice)), Some(()));
            assert_eq!((&out[..6], &out[6..]), (&b"before"[..], &expect[..]), "{count} hashes of {len} bytes");
            let (f, _) = decode(&out[6..]).unwrap().unwrap();
            assert_eq!(Request::decode(&f.body).unwrap(), request);
        }
        let mut out = Vec::new();
        let mixed: [&[u8]; 2] = [&[1; 32], &[2; 31]];
        assert_eq!(encode_packed_lookup(&mut out, 1, mixed), None);
        assert_eq!(encode_packed_lookup(&mut out, 1, [&[0u8; 33][..]]), None, "too long");
        assert_eq!(encode_packed_lookup(&mut out, 1, std::iter::empty()), None, "empty");
        assert!(out.is_empty(), "nothing written when declined");
        let mut out = b"kept".to_vec();
        let late: [&[u8]; 3] = [&[1; 32], &[2; 32], &[3; 8]];
        assert_eq!(encode_packed_lookup(&mut out, 1, late), None, "a late mismatch");
        assert_eq!(out, b"kept", "a late mismatch takes back what was written");
    }

    /// The same bytes are asserted by python/tests/test_protocol.py: both implementations agree.
    #[test]
    fn golden_stats_request() {
        let bytes = frame(FrameKind::Request, 42, &to_body(&Request::Stats(StatsRequest {})));
        assert_eq!(bytes, b"\x16\x00\x00\x00KL\x01\x01*\x00\x00\x00\x00\x00\x00\x00\x81\xa2op\xa5stats");
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = frame(FrameKind::Request, 1, b"\x80");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_and_short_lengths_are_fatal() {
        let mut big = ((MAX_FRAME_BYTES + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(b"KL");
        let e = decode(&big).unwrap_err();
        assert!(e.is_fatal() && matches!(e, FrameError::TooLarge { .. }));
        let e = decode(&3u32.to_le_bytes()).unwrap_err();
        assert_eq!(e, FrameError::TooShort { len: 3 });
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut bytes = frame(FrameKind::Request, 1, b"");
        bytes[4] = b'X';
        assert!(decode(&bytes).unwrap_err().is_fatal());
    }

    #[test]
    fn other_version_skips_the_frame() {
        let mut bytes = frame(FrameKind::Request, 9, b"\x80");
        bytes[6] = 2;
        let e = decode(&bytes).unwrap_err();
        assert_eq!(e, FrameError::UnsupportedVersion { found: 2, request_id: 9 });
        assert!(!e.is_fatal());
        assert_eq!(frame_len(&bytes), Ok(Some(13)));
    }

    #[test]
    fn decode_reads_every_op_like_the_tagged_enum() {
        let requests = [
            Request::Hello(Hello { protocol: 1, client: "c".into(), pid: 3 }),
            Request::Lookup(Lookup { hashes: vec![BlockHashBytes::from(vec![1, 2, 3])], packed: None }),
            Request::Lookup(Lookup { hashes: vec![], packed: PackedHashes::pack([&[1u8, 2][..], &[3, 4][..]]) }),
            Request::Save(Save {
                blocks: vec![SaveBlock { hash: BlockHashBytes::from(vec![9; 32]), block_id: 4 }],
                packed: None,
                after_event: None,
                layer_events: None,
            }),
            Request::Save(Save {
                blocks: vec![],
                packed: PackedSave::pack([(&[9u8; 32][..], 4)]),
                after_event: None,
                layer_events: Some(vec![BlockHashBytes::from(vec![1; 64]), BlockHashBytes::from(vec![2; 64])]),
            }),
            Request::Load(Load { lease: 7, block_ids: vec![1, 2], block_ids_packed: None, layerwise: false }),
            Request::Load(Load {
                lease: 7,
                block_ids: vec![],
                block_ids_packed: Some(BlockHashBytes::from(vec![1, 0, 0, 0])),
                layerwise: true,
            }),
            Request::Release(Release { lease: 7 }),
            Request::Stats(StatsRequest {}),
        ];
        for r in requests {
            let body = to_body(&r);
            assert_eq!(Request::decode(&body).as_ref(), Ok(&r));
            assert_eq!(from_body::<Request>(&body).unwrap(), r);
        }
        assert!(matches!(Request::decode(b"\x81\xa2op\xa3fly"), Err(BodyError::UnknownOp(op)) if op == "fly"));
        assert!(matches!(Request::decode(b"\x81\xa2op\xa4load"), Err(BodyError::Malformed { op: "load", .. })));
        assert!(matches!(Request::decode(b"\xc1"), Err(BodyError::NoOp(_))));
    }

    /// `load_layers` is tagged like the other events and carries its handles as bytes.
    #[test]
    fn load_layers_event_round_trips() {
        let e = Event::LoadLayers(LoadLayers { events: vec![BlockHashBytes::from(vec![7; 64]); 3] });
        let body = to_body(&e);
        assert_eq!(from_body::<Event>(&body).unwrap(), e);
        #[derive(Deserialize)]
        struct Wire {
            op: String,
            events: Vec<BlockHashBytes>,
        }
        let wire: Wire = from_body(&body).unwrap();
        assert_eq!(wire.op, "load_layers");
        assert!(wire.events.len() == 3 && wire.events.iter().all(|h| h.len() == 64));
    }

    #[test]
    fn unknown_op_fails_to_decode() {
        #[derive(Serialize)]
        struct Odd {
            op: &'static str,
        }
        assert!(from_body::<Request>(&to_body(&Odd { op: "fly" })).is_err());
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct Newer {
            op: &'static str,
            protocol: u32,
            client: &'static str,
            future_field: u8,
        }
        let body = to_body(&Newer { op: "hello", protocol: 1, client: "x", future_field: 3 });
        assert!(matches!(from_body::<Request>(&body).unwrap(), Request::Hello(_)));
    }
}
