//! The packet queue on its mirrored volume behind the write cache, and the routing agent
//! over it, with the configured nodes and the external port.

use std::sync::Arc;
use std::time::Duration;

use ftss_proto::vendor::NodeAddr;

use super::media::PACKET_BLOCK;
use super::StartupError;
use crate::config::ResolvedConfig;
use crate::media::cache::WriteCache;
use crate::media::mirror::MirrorSet;
use crate::routing::packet_queue::{PacketQueue, QueueOptions};
use crate::routing::{AgentConfig, RoutingAgent};

/// Opens the packet queue stored as volume `id` (mirror set `set`) of `cache`, and
/// starts the routing agent over it; `None` without `[packets]`.
pub(super) fn start_agent(
    config: &ResolvedConfig,
    cache: &Arc<WriteCache>,
    (id, set): (u32, Arc<MirrorSet>),
) -> Result<Option<Arc<RoutingAgent>>, StartupError> {
    let (Some(p), Some(resolved)) = (&config.file.packets, &config.packets) else {
        return Ok(None);
    };
    let queue = PacketQueue::open(
        Arc::clone(cache),
        id,
        set.blocks(),
        PACKET_BLOCK,
        QueueOptions {
            retain: Duration::from_secs(p.retain_s),
            dedup_window: p.dedup_window,
            dedup_hold: Duration::from_secs(p.dedup_hold_s),
            node_quota_bytes: resolved.node_quota_bytes,
            node_quota_records: p.node_quota_records,
            ..QueueOptions::default()
        },
    )
    .map_err(|source| StartupError::PacketQueue { source })?;
    let nodes = config
        .file
        .nodes
        .iter()
        .zip(&config.node_addresses)
        .map(|(n, addrs)| {
            let addrs = addrs.iter().copied().map(NodeAddr::from).collect();
            (n.initiator.clone(), addrs)
        })
        .collect();
    let agent = RoutingAgent::start_with_interfaces(
        queue,
        AgentConfig {
            nodes,
            delivery_timeout: Duration::from_secs(p.delivery_timeout_s),
            external: resolved.udp.clone(),
            registry: Some(set),
        },
        resolved.interfaces.clone(),
    )
    .map_err(|source| StartupError::RoutingAgent { source })?;
    Ok(Some(agent))
}
