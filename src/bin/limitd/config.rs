//! Command line of `keymeter-limitd`.

use clap::Parser;
use std::net::SocketAddr;

/// keymeter's fleet limit service: leases token-bucket and quota units of a subject to
/// Envoy nodes from Redis, atomically (Lua), so limits hold across the fleet without a
/// network call per request. Stateless: run as many as you like behind an Envoy cluster.
#[derive(Debug, Parser)]
#[command(name = "keymeter-limitd", version)]
pub struct Args {
    /// Address to serve HTTP on (loopback by default; port 0 picks a free port, printed
    /// on stdout).
    #[arg(long, default_value = "127.0.0.1:8181")]
    pub listen: SocketAddr,
    /// Redis or Valkey URL (redis://[user:pass@]host:port[/db]).
    #[arg(long, default_value = "redis://127.0.0.1:6379", conflicts_with = "redis_cluster")]
    pub redis: String,
    /// Redis Cluster seed node URL; repeat for several. Replaces --redis.
    #[arg(long)]
    pub redis_cluster: Vec<String>,
    /// Bound on every Redis call, in ms: an outage costs a caller at most this.
    #[arg(long, default_value_t = 50)]
    pub redis_timeout_ms: u64,
    /// Forget a node's sequence number and cumulative spend this long after its last
    /// call, in ms (restarted Envoys come back as new nodes).
    #[arg(long, default_value_t = crate::scripts::DEFAULT_FORGET_MS)]
    pub forget_node_ms: u64,
    /// Remember each take a node tagged this long, in ms, so that a take whose answer
    /// the node lost is settled exactly (neither counted twice nor for a refused
    /// request) by the node's next lease call within this time.
    #[arg(long, default_value_t = crate::scripts::DEFAULT_TAKE_RECORD_MS)]
    pub take_record_ms: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}
