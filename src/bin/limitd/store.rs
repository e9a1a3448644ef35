//! The Redis connection: one server (Redis or Valkey, through a reconnecting
//! `ConnectionManager`) or a Redis Cluster (slot-aware `ClusterConnection`, which
//! follows MOVED/ASK). Every call is bounded by the configured timeout, so an outage
//! costs a caller at most that long; scripts go by EVALSHA and are loaded on NOSCRIPT
//! (a restarted or failed-over Redis has an empty script cache).

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisResult, Script, Value};
use std::time::Duration;
use tokio::sync::Mutex;

pub enum Backend {
    Single(ConnectionManager),
    /// Connected on first use and again after a failed connect, so limitd starts (and
    /// answers health checks with 503) while the cluster is down.
    Cluster(Box<Cluster>),
}

pub struct Cluster {
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
}

/// Why a Redis call did not answer.
#[derive(Debug)]
pub enum StoreError {
    Timeout,
    Redis(redis::RedisError),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Timeout => f.write_str("redis did not answer in time"),
            StoreError::Redis(e) => write!(f, "redis: {e}"),
        }
    }
}

pub struct Store {
    backend: Backend,
    timeout: Duration,
}

impl Store {
    pub fn single(url: &str, timeout: Duration) -> RedisResult<Store> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Store {
            backend: Backend::Single(manager),
            timeout,
        })
    }

    pub fn cluster(nodes: &[String], timeout: Duration) -> RedisResult<Store> {
        let client = ClusterClient::builder(nodes.to_vec())
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .build()?;
        Ok(Store {
            backend: Backend::Cluster(Box::new(Cluster {
                client,
                conn: Mutex::new(None),
            })),
            timeout,
        })
    }

    async fn cluster_conn(
        client: &ClusterClient,
        conn: &Mutex<Option<ClusterConnection>>,
    ) -> RedisResult<ClusterConnection> {
        let mut guard = conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let c = client.get_async_connection().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(StoreError::Redis),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// EVALSHA `script` (SCRIPT LOAD and retry on NOSCRIPT).
    pub async fn eval(&self, script: &Script, keys: &[String], args: &[String]) -> Result<Vec<i64>, StoreError> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(a);
        }
        match &self.backend {
            Backend::Single(m) => {
                let mut m = m.clone();
                self.bounded(inv.invoke_async(&mut m)).await
            }
            Backend::Cluster(cl) => {
                self.bounded(async {
                    let mut c = Self::cluster_conn(&cl.client, &cl.conn).await?;
                    inv.invoke_async(&mut c).await
                })
                .await
            }
        }
    }

    /// One command on whichever backend this is, bounded by the timeout.
    async fn query<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, StoreError> {
        match &self.backend {
            Backend::Single(m) => {
                let mut m = m.clone();
                self.bounded(cmd.query_async(&mut m)).await
            }
            Backend::Cluster(cl) => {
                self.bounded(async {
                    let mut c = Self::cluster_conn(&cl.client, &cl.conn).await?;
                    cmd.query_async(&mut c).await
                })
                .await
            }
        }
    }

    /// HGETALL `key` as field/value pairs.
    pub async fn hgetall(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(key);
        self.query(cmd).await
    }

    /// PING, for the health check.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _: Value = self.query(redis::cmd("PING")).await?;
        Ok(())
    }
}
