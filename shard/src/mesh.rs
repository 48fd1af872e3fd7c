//! The full mesh of bounded channels between shards.
//!
//! Every ordered pair of shards gets its own single-producer, single-consumer glommio shared
//! channel of [`MESH_CHANNEL_CAPACITY`] messages: no lock, and a sender that outruns its peer
//! waits instead of growing a queue. The channels are made on the starting thread and each
//! shard's ends are moved into its executor, so peer ids equal shard ids by construction.

use crate::route::ShardId;
use glommio::channels::shared_channel::{self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender};
use glommio::{GlommioError, ResourceType};

/// Messages in flight between two shards at most, per direction.
pub const MESH_CHANNEL_CAPACITY: usize = 128;

/// One shard's unconnected channel ends, ready to move into its executor.
pub struct MeshEnds<T: Send + 'static> {
    id: ShardId,
    senders: Vec<Option<SharedSender<T>>>,
    receivers: Vec<Option<SharedReceiver<T>>>,
}

impl<T: Send + 'static> std::fmt::Debug for MeshEnds<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MeshEnds {{ id: {}, peers: {} }}", self.id, self.senders.len())
    }
}

/// Builds the ends of an `n`-shard mesh, one [`MeshEnds`] per shard, by shard id.
pub fn build<T: Send + 'static>(n: usize) -> Vec<MeshEnds<T>> {
    let mut ends: Vec<MeshEnds<T>> = (0..n)
        .map(|id| MeshEnds { id, senders: (0..n).map(|_| None).collect(), receivers: (0..n).map(|_| None).collect() })
        .collect();
    for from in 0..n {
        for to in (0..n).filter(|&to| to != from) {
            let (tx, rx) = shared_channel::new_bounded(MESH_CHANNEL_CAPACITY);
            ends[from].senders[to] = Some(tx);
            ends[to].receivers[from] = Some(rx);
        }
    }
    ends
}

/// A shard's connected senders (`None` at its own id).
pub struct MeshSenders<T: Send + 'static> {
    senders: Vec<Option<ConnectedSender<T>>>,
}

impl<T: Send + 'static> MeshSenders<T> {
    /// Sends `msg` to shard `to`, waiting while the channel is full. Fails when `to` is this
    /// shard or has stopped, giving the message back where the channel returned it.
    pub async fn send_to(&self, to: ShardId, msg: T) -> Result<(), Option<T>> {
        let Some(sender) = self.senders.get(to).and_then(Option::as_ref) else { return Err(Some(msg)) };
        sender.send(msg).await.map_err(|e| match e {
            GlommioError::Closed(ResourceType::Channel(msg)) | GlommioError::WouldBlock(ResourceType::Channel(msg)) => {
                Some(msg)
            }
            _ => None,
        })
    }
}

impl<T: Send + 'static> MeshEnds<T> {
    /// Connects this shard's ends; must run inside the shard's executor. Returns the senders and
    /// the receivers paired with the sending shard's id.
    pub async fn connect(self) -> (MeshSenders<T>, Vec<(ShardId, ConnectedReceiver<T>)>) {
        // Each connect waits for the peer's matching end, so all of them are spawned before any is
        // awaited; connecting one by one would deadlock two shards waiting on each other.
        let senders: Vec<_> = self.senders.into_iter().map(|s| s.map(|s| glommio::spawn_local(s.connect()))).collect();
        let receivers: Vec<_> = self
            .receivers
            .into_iter()
            .enumerate()
            .filter_map(|(from, r)| r.map(|r| (from, glommio::spawn_local(r.connect()))))
            .collect();
        let mut connected = Vec::with_capacity(senders.len());
        for s in senders {
            connected.push(match s {
                Some(task) => Some(task.await),
                None => None,
            });
        }
        let mut inbound = Vec::with_capacity(receivers.len());
        for (from, task) in receivers {
            inbound.push((from, task.await));
        }
        (MeshSenders { senders: connected }, inbound)
    }
}
