//! `keymeter-limitd` against real `redis-server` processes (Debian's, installed by
//! `make test`), each on a free loopback port and stopped when its guard drops, also when
//! a test panics. Nodes are played by threads driving the core `Lease` type, so the
//! protocol is tested end to end with the same holder logic the filter uses.
//!
//! The key scenarios run again on Valkey (module `valkey` at the end): the same test
//! functions with the server binary switched for the test's thread. Valkey's binary is
//! `$VALKEY_SERVER`, else `.tools/valkey/bin/valkey-server` (`make fleet-tools` puts it
//! there, from Debian's bookworm-backports).

use keymeter::core::limits::lease::{bounds, Ask, Lease, LeasePolicy};
use keymeter::core::limits::quota::{period_bounds, Period};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// --------------------------------------------------------------------------- processes

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "keymeter-limitd-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Sends one RESP command, returns the raw first reply line.
fn resp(port: u16, args: &[&str]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut cmd = format!("*{}\r\n", args.len());
    for a in args {
        cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(cmd.as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// Which server `Redis::start` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    Redis,
    Valkey,
}

std::thread_local! {
    /// The server of the test running on this thread (`valkey::*` switch it).
    static SERVER: std::cell::Cell<Server> = const { std::cell::Cell::new(Server::Redis) };
}

impl Server {
    fn current() -> Server {
        SERVER.with(|s| s.get())
    }

    /// (server binary, cli binary).
    fn binaries(self) -> (PathBuf, PathBuf) {
        match self {
            Server::Redis => ("redis-server".into(), "redis-cli".into()),
            Server::Valkey => {
                let server = std::env::var_os("VALKEY_SERVER").map(PathBuf::from).unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/valkey/bin/valkey-server")
                });
                assert!(
                    server.exists(),
                    "{} not found: run `make fleet-tools` (it unpacks Valkey from bookworm-backports)",
                    server.display()
                );
                let cli = server.with_file_name("valkey-cli");
                (server, cli)
            }
        }
    }
}

/// Runs `test` with `Redis::start` starting valkey-server instead of redis-server.
fn on_valkey(test: fn()) {
    SERVER.with(|s| s.set(Server::Valkey));
    test();
}

/// A redis-server (or valkey-server) child, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    server: Server,
}

impl Redis {
    fn start(extra: &[&str]) -> Redis {
        let mut r = Redis {
            server: Server::current(),
            child: None,
            port: free_port(),
            dir: scratch_dir("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let child = Command::new(self.server.binaries().0)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("server not found: run `make fleet-tools` (Debian's redis-server, Valkey from backports)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if resp(self.port, &["PING"]).is_ok_and(|l| l.starts_with("+PONG")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {} did not answer PING", self.port);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A keymeter-limitd child on a port it picked itself, killed on drop.
struct Limitd {
    child: Child,
    port: u16,
}

impl Limitd {
    fn start(redis_args: &[String]) -> Limitd {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keymeter-limitd"))
            .args(["--listen", "127.0.0.1:0", "--redis-timeout-ms", "100"])
            .args(redis_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        Limitd { child, port }
    }

    fn single(redis: &Redis) -> Limitd {
        Limitd::start(&["--redis".into(), redis.url()])
    }
}

impl Drop for Limitd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// --------------------------------------------------------------------------- http

fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: limitd\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw[9..12].parse().unwrap();
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

// --------------------------------------------------------------------------- nodes

const MONTH: &str = "month";

fn quota(limit: u64) -> Value {
    json!([{"name": "monthly", "period": MONTH, "limit": limit}])
}

/// One node's view of one subject: the core lease plus its sequence number.
struct Node {
    id: String,
    seq: u64,
    lease: Lease,
    policy: LeasePolicy,
    fleet_size: u64,
    ttl_ms: u64,
    /// R sent with every call (`unreported_max`); `None`: the field is left out.
    unreported_max: Option<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

impl Node {
    fn new(id: &str, fleet_size: u64, max_chunk: u64) -> Node {
        Node {
            id: id.into(),
            seq: 0,
            lease: Lease::default(),
            policy: LeasePolicy {
                max_chunk,
                initial_chunk: max_chunk,
                renew_before_ms: 100,
                refill_timeout_ms: 2_000,
            },
            fleet_size,
            ttl_ms: 10_000,
            unreported_max: None,
        }
    }

    fn body(&mut self, subject: &str, ask: &Ask, limits: &Value) -> Value {
        self.seq += 1;
        let mut b = json!({
            "node": self.id, "seq": self.seq, "subject": subject, "fleet_size": self.fleet_size,
            "ttl_ms": self.ttl_ms, "want": ask.want, "hold": ask.hold, "returned": ask.returned,
            "spent_total": ask.spent_total,
        });
        if let Some(r) = self.unreported_max {
            b["unreported_max"] = json!(r);
        }
        for (k, v) in limits.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    /// Sends `ask` and applies the answer to the lease; returns the response.
    fn call(&mut self, port: u16, subject: &str, ask: Ask, limits: &Value) -> Value {
        let body = self.body(subject, &ask, limits);
        let (status, r) = post(port, "/v1/lease", &body);
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["applied"], true, "{r}");
        let granted = r["granted"].as_u64().unwrap();
        self.lease.on_grant(&ask, granted, r["valid_ms"].as_u64().unwrap());
        r
    }

    fn refill(&mut self, port: u16, subject: &str, limits: &Value) -> Option<Value> {
        let ask = self.lease.begin_refill(now_ms(), &self.policy)?;
        Some(self.call(port, subject, ask, limits))
    }

    fn release(&mut self, port: u16, subject: &str, limits: &Value) -> Value {
        let ask = self.lease.release(now_ms());
        self.call(port, subject, ask, limits)
    }
}

fn peek(port: u16, subject: &str, limit: u64) -> Value {
    let (status, r) = post(port, "/v1/peek", &json!({"subject": subject, "quotas": quota(limit)}));
    assert_eq!(status, 200, "{r}");
    r["quotas"][0].clone()
}

// --------------------------------------------------------------------------- tests

#[test]
fn grants_shrink_to_one_near_the_quota_and_never_exceed_it() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"quotas": quota(100)});
    let mut n = Node::new("n1", 3, 1_000);
    let mut grants = Vec::new();
    for _ in 0..200 {
        let ask = n.lease.begin_refill(now_ms(), &n.policy).unwrap();
        let ask = Ask { want: 1_000, ..ask };
        let r = n.call(d.port, "k:shrink", ask, &limits);
        let g = r["granted"].as_u64().unwrap();
        if g == 0 {
            break;
        }
        grants.push(g);
        assert!(n.lease.try_spend(g, now_ms()));
    }
    // available / 6 at each step: 16 of 100, 14 of 84, 11 of 70, ... then single units.
    assert_eq!(&grants[..4], &[16, 14, 11, 9], "{grants:?}");
    assert!(grants.iter().rev().take(6).all(|&g| g == 1), "{grants:?}");
    assert_eq!(grants.iter().sum::<u64>(), 100, "exactly the quota, never more");
    // Each call reported the spend so far: all 100 consumed, nothing held.
    let q = peek(d.port, "k:shrink", 100);
    assert_eq!(
        (q["consumed"].as_u64(), q["holders"].as_object().unwrap().len()),
        (Some(100), 0)
    );
    n.release(d.port, "k:shrink", &limits);
    assert_eq!(peek(d.port, "k:shrink", 100)["consumed"], 100);
}

#[test]
fn returned_units_come_back_and_reports_count_once() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"quotas": quota(1_000)});
    let mut a = Node::new("a", 2, 200);
    let r = a.refill(d.port, "c:acme", &limits).unwrap();
    assert_eq!(r["granted"], 200);
    assert!(a.lease.try_spend(30, now_ms()));
    // Give back the 170 unspent, report 30 spent.
    let r = a.release(d.port, "c:acme", &limits);
    assert_eq!(r["quotas"][0]["consumed"], 30);
    assert_eq!(r["quotas"][0]["outstanding"], 0);
    assert_eq!(r["quotas"][0]["available"], 970);
    // The same report again (a retry with a new seq) counts nothing more.
    let ask = a.lease.release(now_ms());
    assert_eq!(ask.spent_total, 30);
    let r = a.call(d.port, "c:acme", ask, &limits);
    assert_eq!(r["quotas"][0]["consumed"], 30);
}

#[test]
fn replayed_and_reordered_calls_change_nothing() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"quotas": quota(1_000)});
    let mut body = json!({"node": "n1", "seq": 5, "subject": "k:replay", "fleet_size": 1, "ttl_ms": 10_000,
                          "want": 0, "hold": 0, "spent_total": 10, "quotas": limits["quotas"]});
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(
        (r["applied"].as_bool(), r["quotas"][0]["consumed"].as_u64()),
        (Some(true), Some(10))
    );
    // Exactly the same call again (a lost answer retried by a proxy): ignored.
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(r["applied"], false);
    // An older call arriving late, claiming more: ignored.
    body["seq"] = json!(4);
    body["spent_total"] = json!(20);
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(r["applied"], false);
    assert_eq!(peek(d.port, "k:replay", 1_000)["consumed"], 10);
    // A newer call with the same cumulative total (replay after an outage): counted once.
    body["seq"] = json!(6);
    body["spent_total"] = json!(10);
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(
        (r["applied"].as_bool(), r["quotas"][0]["consumed"].as_u64()),
        (Some(true), Some(10))
    );
    body["seq"] = json!(7);
    body["spent_total"] = json!(15);
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(r["quotas"][0]["consumed"], 15);
    // Another node's sequence is its own.
    body["node"] = json!("n2");
    body["seq"] = json!(1);
    body["spent_total"] = json!(4);
    let (_, r) = post(d.port, "/v1/lease", &body);
    assert_eq!(r["quotas"][0]["consumed"], 19);
}

/// A node that declares no bound R (an older node): all its held units come back.
#[test]
fn a_dead_nodes_lease_comes_back_after_its_ttl() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"quotas": quota(60)});
    let mut dead = Node::new("dead", 1, 1_000);
    dead.ttl_ms = 600;
    let r = dead.refill(d.port, "k:ttl", &limits).unwrap();
    assert_eq!(r["granted"], 30, "60 / (2 x 1)");
    assert!(dead.lease.try_spend(5, now_ms()));
    // It reports 5 spent and keeps 25, then dies without returning them.
    let ask = dead
        .lease
        .begin_refill(now_ms(), &dead.policy)
        .map(|a| Ask { want: 0, ..a })
        .unwrap();
    dead.call(d.port, "k:ttl", ask, &limits);
    let t_report = Instant::now();
    let mut live = Node::new("live", 1, 1_000);
    let r = live.refill(d.port, "k:ttl", &limits).unwrap();
    assert_eq!(r["quotas"][0]["outstanding"], 25 + 15, "the dead node's 25 and our 15");
    assert_eq!(r["granted"], 15, "(60 - 5 - 25) / 2");
    std::thread::sleep(Duration::from_millis(700).saturating_sub(t_report.elapsed()));
    // (An idle node would ask for 1; ask for more to see what is available.)
    let ask = Ask {
        want: 1_000,
        ..live.lease.begin_refill(now_ms(), &live.policy).unwrap()
    };
    let r = live.call(d.port, "k:ttl", ask, &limits);
    let q = &r["quotas"][0];
    assert_eq!(q["consumed"], 5);
    assert_eq!(q["outstanding"].as_u64().unwrap(), 15 + r["granted"].as_u64().unwrap());
    assert_eq!(r["granted"], 20, "after the TTL the 25 are back: (60 - 5 - 15) / 2");
}

/// A node dies (SIGKILL) after admitting units it never reported. With R declared, the
/// fleet counts min(R, held) of its expired lease as consumed: the total admitted never
/// exceeds the quota, the rest of the lease (hold - reported - R') comes back, and the
/// fleet loses at most R. If the node was only cut off, its late report replaces the
/// presumption with what it really spent, and the units it still claims are void.
#[test]
fn a_killed_nodes_unreported_spend_is_never_admitted_twice() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    const LIMIT: u64 = 100;
    let limits = json!({"quotas": quota(LIMIT)});
    let r = bounds::unreported_max(LIMIT, 10, 1_000);
    assert_eq!(r, 10);
    let mut dead = Node::new("dead", 2, 1_000);
    dead.ttl_ms = 600;
    dead.unreported_max = Some(r);
    let g = dead.refill(d.port, "k:kill", &limits).unwrap()["granted"]
        .as_u64()
        .unwrap();
    assert_eq!(g, 25, "100 / (2 x 2)");
    // Spends 8, reports them (keeping 17), spends 7 more (< R) and dies unreported.
    assert!(dead.lease.try_spend(8, now_ms()));
    let ask = Ask {
        want: 0,
        ..dead.lease.begin_refill(now_ms(), &dead.policy).unwrap()
    };
    dead.call(d.port, "k:kill", ask, &limits);
    let (reported, held) = (dead.lease.reported_total, dead.lease.available);
    assert_eq!((reported, held), (8, 17));
    let mut dead_admitted = 8;
    while dead.lease.unreported() < 7 {
        assert!(dead.lease.unreported() < r && dead.lease.try_spend(1, now_ms()));
        dead_admitted += 1;
    }
    let killed = Instant::now();

    let mut live = Node::new("live", 2, 1_000);
    live.unreported_max = Some(r);
    let drain = |live: &mut Node| {
        let mut got = 0;
        for _ in 0..200 {
            let ask = Ask {
                want: 1_000,
                ..live.lease.begin_refill(now_ms(), &live.policy).unwrap()
            };
            let g = live.call(d.port, "k:kill", ask, &limits)["granted"].as_u64().unwrap();
            if g == 0 {
                break;
            }
            assert!(live.lease.try_spend(g, now_ms()));
            got += g;
        }
        got
    };
    let first = drain(&mut live);
    assert!(
        killed.elapsed() < Duration::from_millis(600),
        "drained within the dead lease's TTL"
    );
    assert_eq!(first, LIMIT - reported - held, "the dead node's 17 are still held");
    assert!(dead_admitted + first <= LIMIT);
    std::thread::sleep(Duration::from_millis(700).saturating_sub(killed.elapsed()));
    let second = drain(&mut live);
    let presumed = r.min(held);
    assert_eq!(second, held - presumed, "hold - reported - R' comes back");
    let total = dead_admitted + first + second;
    assert!(total <= LIMIT, "never more than the quota: {total}");
    assert!(
        LIMIT - total <= bounds::crash_under_admission_max(1, r),
        "lost at most R: {total}"
    );
    live.release(d.port, "k:kill", &limits);
    let q = peek(d.port, "k:kill", LIMIT);
    assert_eq!(q["consumed"], reported + presumed + first + second);
    assert!(q["holders"].as_object().unwrap().is_empty());
    eprintln!(
        "killed node: admitted {dead_admitted} ({} unreported), held {held}; R = {r}: {second} came back, {total} of {LIMIT} admitted",
        dead_admitted - reported
    );

    // It was only cut off: a call it sent before its lease expired arrives now. It
    // reports the 7 it really spent (replacing the 10 presumed) and claims its 10
    // remaining units, which the fleet has reclaimed: void.
    let ask = Ask {
        want: 0,
        hold: dead.lease.available,
        returned: 0,
        spent_total: dead.lease.spent_total,
        sent_at_ms: now_ms(),
    };
    assert_eq!((ask.hold, ask.spent_total), (10, 15));
    let body = dead.body("k:kill", &ask, &limits);
    let (status, resp) = post(d.port, "/v1/lease", &body);
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["hold_void"], true, "{resp}");
    let q = &resp["quotas"][0];
    assert_eq!(q["consumed"], reported + 7 + first + second, "{resp}");
    assert_eq!(
        (q["outstanding"].as_u64(), q["available"].as_u64()),
        (Some(0), Some(presumed - 7))
    );
}

/// Six nodes, through two limitd instances, race for a quota of 1000: never more than
/// 1000 are spent, and once every node has returned its lease exactly 1000 are.
#[test]
fn quota_is_never_exceeded_by_concurrent_nodes() {
    let redis = Redis::start(&[]);
    let d1 = Limitd::single(&redis);
    let d2 = Limitd::single(&redis);
    let ports = [d1.port, d2.port];
    let limits = json!({"quotas": quota(1_000)});
    let spent = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let (spent, calls, limits) = (spent.clone(), calls.clone(), limits.clone());
            let port = ports[i % 2];
            std::thread::spawn(move || {
                let mut n = Node::new(&format!("node{i}"), 6, 50);
                let mut empty = 0;
                while empty < 3 {
                    if n.lease.needs_refill(now_ms(), &n.policy) {
                        if let Some(r) = n.refill(port, "k:race", &limits) {
                            calls.fetch_add(1, Ordering::Relaxed);
                            if r["granted"] == 0 && n.lease.available == 0 {
                                empty += 1;
                            }
                        }
                    }
                    if n.lease.try_spend(1, now_ms()) {
                        let total = spent.fetch_add(1, Ordering::Relaxed) + 1;
                        assert!(total <= 1_000, "spent {total} of a 1000 quota");
                    }
                }
                n.release(port, "k:race", &limits);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(spent.load(Ordering::Relaxed), 1_000);
    let q = peek(d1.port, "k:race", 1_000);
    assert_eq!(q["consumed"], 1_000, "every spend reported exactly once");
    assert!(q["holders"].as_object().unwrap().is_empty());
    eprintln!(
        "quota race: 1000 admitted by 6 nodes in {} lease calls",
        calls.load(Ordering::Relaxed)
    );
}

/// Three nodes draw from one token bucket (rate 200/s, burst 50) for ~1.5 s: the units
/// granted never exceed burst + rate x elapsed, and the bucket is kept busy.
#[test]
fn token_bucket_is_shared_across_nodes() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"buckets": [{"name": "ps", "rate": 200, "interval_ms": 1000, "burst": 50}]});
    let granted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let (granted, limits) = (granted.clone(), limits.clone());
            std::thread::spawn(move || {
                let mut n = Node::new(&format!("b{i}"), 3, 20);
                n.ttl_ms = 1_000;
                while start.elapsed() < Duration::from_millis(1_500) {
                    let ask = n.lease.begin_refill(now_ms(), &n.policy).unwrap();
                    let ask = Ask { want: 20, ..ask };
                    let r = n.call(d.port, "k:bucket", ask, &limits);
                    granted.fetch_add(r["granted"].as_u64().unwrap(), Ordering::Relaxed);
                    let avail = n.lease.available;
                    assert!(n.lease.try_spend(avail, now_ms()));
                    let wait = r["buckets"][0]["wait_ms"].as_u64().unwrap();
                    std::thread::sleep(Duration::from_millis(wait.max(2)));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed().as_millis() as u64;
    let g = granted.load(Ordering::Relaxed);
    let max = bounds::rate_admitted_max(200, 1_000, 50, elapsed, 0);
    assert!(g <= max, "granted {g} > {max} in {elapsed} ms");
    // The nodes poll every few ms: the bucket never sits full for long.
    assert!(g * 10 >= max * 8, "granted {g}, expected about {max}");
    eprintln!("token bucket: {g} granted in {elapsed} ms, bound {max}");
}

#[test]
fn redis_outage_costs_one_timeout_and_recovers_without_restart() {
    let mut redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"quotas": quota(100)});
    let mut n = Node::new("n", 1, 10);
    n.refill(d.port, "k:down", &limits).unwrap();
    redis.kill();
    for _ in 0..3 {
        let t = Instant::now();
        let ask = Ask {
            want: 1,
            hold: 0,
            returned: 0,
            spent_total: 0,
            sent_at_ms: now_ms(),
        };
        let body = n.body("k:down", &ask, &limits);
        let (status, r) = post(d.port, "/v1/lease", &body);
        assert_eq!(status, 503, "{r}");
        assert_eq!(r["type"], "urn:keymeter:problem:store-unavailable");
        // limitd runs with --redis-timeout-ms 100; a refused connection is even faster.
        assert!(t.elapsed() < Duration::from_millis(1_000), "{:?}", t.elapsed());
    }
    redis.spawn(); // same port, empty data set
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ask = n.lease.begin_refill(now_ms(), &n.policy);
        let ask = ask.unwrap_or(Ask {
            want: 1,
            hold: 0,
            returned: 0,
            spent_total: 0,
            sent_at_ms: now_ms(),
        });
        let body = n.body("k:down", &ask, &limits);
        let (status, r) = post(d.port, "/v1/lease", &body);
        if status == 200 {
            assert_eq!(r["applied"], true);
            // The empty Redis learns what the node still holds from `hold`.
            assert_eq!(
                r["quotas"][0]["outstanding"].as_u64(),
                Some(ask.hold + r["granted"].as_u64().unwrap())
            );
            break;
        }
        n.lease.on_failure();
        assert!(Instant::now() < deadline, "limitd did not reconnect: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn quota_periods_are_the_cores_utc_calendar_periods() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let mut n = Node::new("n", 1, 10);
    let limits = json!({"quotas": [{"name": "d", "period": "day", "limit": 10},
                                   {"name": "w", "period": "week", "limit": 10},
                                   {"name": "m", "period": "month", "limit": 10}]});
    let r = n.refill(d.port, "k:period", &limits).unwrap();
    let now = (now_ms() / 1000) as i64;
    for (i, p) in [Period::Day, Period::Week, Period::Month].into_iter().enumerate() {
        let (start, end) = period_bounds(p, now);
        let q = &r["quotas"][i];
        assert_eq!(
            (q["period_start"].as_i64(), q["period_end"].as_i64()),
            (Some(start), Some(end)),
            "{p:?}"
        );
    }
    // The lease never outlives the shortest period.
    let day_end = period_bounds(Period::Day, now).1 as u64 * 1000;
    assert!(r["valid_ms"].as_u64().unwrap() <= day_end - r["now_ms"].as_u64().unwrap());
    // Keys carry the subject's hash tag.
    let keys = resp(redis.port, &["DBSIZE"]).unwrap();
    assert_eq!(keys.trim(), ":4", "node record + 3 quota periods");
}

#[test]
fn bad_requests_are_refused_with_the_field_named() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    for (body, field) in [
        (
            json!({"node": "n", "seq": 1, "subject": "k:{x}", "ttl_ms": 1, "quotas": quota(1)}),
            "subject",
        ),
        (
            json!({"node": "n", "seq": 1, "subject": "k:x", "ttl_ms": 1}),
            "buckets, quotas",
        ),
        (
            json!({"node": "n", "seq": 0, "subject": "k:x", "ttl_ms": 1, "quotas": quota(1)}),
            "seq",
        ),
        (
            json!({"node": "n", "seq": 1, "subject": "k:x", "ttl_ms": 1, "quotas": quota(0)}),
            "quotas[0].limit",
        ),
        (json!({"nope": 1}), "invalid lease request"),
    ] {
        let (status, r) = post(d.port, "/v1/lease", &body);
        assert_eq!(status, 400, "{body}");
        assert!(r["detail"].as_str().unwrap().starts_with(field), "{r}");
    }
    assert_eq!(resp(redis.port, &["DBSIZE"]).unwrap().trim(), ":0", "nothing written");
}

/// Three masters in a real Redis Cluster: subjects land on different slots and nodes,
/// every script call stays within one slot (no CROSSSLOT), MOVED is followed.
#[test]
fn works_on_a_redis_cluster() {
    let nodes: Vec<Redis> = (0..3)
        .map(|_| {
            Redis::start(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--appendonly",
                "no",
            ])
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|r| format!("127.0.0.1:{}", r.port)).collect();
    let mut create = Command::new(nodes[0].server.binaries().1);
    create
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"]);
    let out = create.output().expect("redis-cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !nodes.iter().all(|n| {
        Command::new(n.server.binaries().1)
            .args(["-p", &n.port.to_string(), "cluster", "info"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
    }) {
        assert!(Instant::now() < deadline, "cluster did not become ok");
        std::thread::sleep(Duration::from_millis(100));
    }
    let args: Vec<String> = addrs
        .iter()
        .flat_map(|a| ["--redis-cluster".to_string(), format!("redis://{a}")])
        .collect();
    let d = Limitd::start(&args);
    // One token an hour: no refill during the test, so the burst is exactly what is granted.
    let limits =
        json!({"buckets": [{"name": "s", "rate": 1, "interval_ms": 3_600_000, "burst": 10}], "quotas": quota(40)});
    for subject in [
        "k:alpha",
        "k:bravo",
        "c:charlie",
        "ip:203.0.113.7",
        "k:echo",
        "c:foxtrot",
    ] {
        let mut n = Node::new("n", 1, 100);
        let mut total = 0;
        for _ in 0..50 {
            let Some(r) = n.refill(d.port, subject, &limits) else {
                break;
            };
            let g = r["granted"].as_u64().unwrap();
            if g == 0 {
                break;
            }
            total += g;
            let avail = n.lease.available;
            assert!(n.lease.try_spend(avail, now_ms()));
        }
        assert_eq!(total, 10, "{subject}: the burst of 10 (the quota of 40 is larger)");
        n.release(d.port, subject, &limits);
        assert_eq!(peek(d.port, subject, 40)["consumed"], 10, "{subject}");
    }
    // The subjects' keys are spread over the three masters.
    let used = nodes
        .iter()
        .filter(|n| resp(n.port, &["DBSIZE"]).is_ok_and(|l| l.trim() != ":0"))
        .count();
    assert!(used >= 2, "all subjects on one master");
}

/// `POST /v1/take`: a request's cost at once, all or nothing, counted as consumed; held
/// leases count against it; concurrent takes never exceed the quota.
#[test]
fn take_is_all_or_nothing_and_never_exceeds_the_quota() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let bucket = json!([{"name": "s", "rate": 1, "interval_ms": 3_600_000, "burst": 3}]);
    let take = |cost: u64, subject: &str, limits: &Value| {
        let mut b = json!({"subject": subject, "cost": cost});
        for (k, v) in limits.as_object().unwrap() {
            b[k] = v.clone();
        }
        post(d.port, "/v1/take", &b)
    };
    let limits = json!({"buckets": bucket, "quotas": quota(5)});
    let (s, r) = take(2, "k:take", &limits);
    assert_eq!((s, r["admitted"].as_bool()), (200, Some(true)), "{r}");
    assert_eq!(
        (r["buckets"][0]["tokens"].as_u64(), r["quotas"][0]["consumed"].as_u64()),
        (Some(1), Some(2))
    );
    // 1 token left: a cost of 2 takes nothing from either limit, and says how long to wait.
    let (_, r) = take(2, "k:take", &limits);
    assert_eq!(r["admitted"], false);
    let wait = r["buckets"][0]["wait_ms"].as_u64().unwrap();
    assert!(
        (3_590_000..=3_600_000).contains(&wait),
        "one more token in an hour: {wait}"
    );
    assert_eq!(r["quotas"][0]["consumed"], 2);
    // Units held by a node's lease are not available to takes.
    let mut n = Node::new("holder", 1, 40);
    n.refill(d.port, "k:held", &json!({"quotas": quota(50)})).unwrap();
    assert_eq!(n.lease.available, 25, "50 / (2 x 1)");
    let (_, r) = take(26, "k:held", &json!({"quotas": quota(50)}));
    assert_eq!(r["admitted"], false);
    let (_, r) = take(25, "k:held", &json!({"quotas": quota(50)}));
    assert_eq!(r["admitted"], true);
    // Eight racing callers, cost 1 each, quota 50: exactly 50 admitted.
    let admitted = Arc::new(AtomicU64::new(0));
    let port = d.port;
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let admitted = admitted.clone();
            std::thread::spawn(move || {
                for _ in 0..20 {
                    let (s, r) = post(
                        port,
                        "/v1/take",
                        &json!({"subject": "k:race-take", "cost": 1, "quotas": quota(50)}),
                    );
                    assert_eq!(s, 200);
                    if r["admitted"] == true {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 50);
    assert_eq!(peek(d.port, "k:race-take", 50)["consumed"], 50);
}

/// A take whose answer the node lost: the node decided the request itself (admitted it
/// as overdraft, reported as its spend, or refused it), so its next lease call names
/// the take and limitd settles it exactly once: an applied take's cost comes off the
/// count again, one that has not arrived is voided and changes nothing when it does,
/// and a take is never applied twice.
#[test]
fn a_take_whose_answer_was_lost_is_settled_exactly_once() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let subject = "k:doubt";
    let take = |id: u64| {
        post(
            d.port,
            "/v1/take",
            &json!({"subject": subject, "cost": 1, "quotas": quota(10), "node": "n1", "id": id}),
        )
        .1
    };
    let mut seq = 0;
    let mut lease = |spent_total: u64, doubts: Value| {
        seq += 1;
        let body = json!({"node": "n1", "seq": seq, "subject": subject, "fleet_size": 1, "ttl_ms": 10_000,
                          "want": 0, "spent_total": spent_total, "quotas": quota(10), "doubts": doubts});
        let (status, r) = post(d.port, "/v1/lease", &body);
        assert_eq!((status, &r["applied"]), (200, &json!(true)), "{r}");
        r
    };
    let consumed = || peek(d.port, subject, 10)["consumed"].as_u64().unwrap();

    // Take 1 applied, its answer lost; the node admitted the request as overdraft.
    assert_eq!(take(1)["admitted"], true);
    assert_eq!(consumed(), 1);
    let r = lease(1, json!([{"id": 1, "cost": 1}]));
    assert_eq!(r["settled"], json!([1]));
    assert_eq!(consumed(), 1, "one request, counted once");
    // Named again (that answer lost too): nothing more.
    lease(1, json!([{"id": 1, "cost": 1}]));
    assert_eq!(consumed(), 1);

    // Take 2 applied, its answer lost; the node refused the request (no spend).
    assert_eq!(take(2)["admitted"], true);
    assert_eq!(consumed(), 2);
    lease(1, json!([{"id": 2, "cost": 1}]));
    assert_eq!(consumed(), 1, "a refused request is not counted");

    // Take 3 settled before it arrives: void when it does.
    lease(2, json!([{"id": 3, "cost": 1}]));
    assert_eq!(consumed(), 2);
    assert_eq!(take(3)["admitted"], false, "a take settled as never applied is void");
    assert_eq!(consumed(), 2);

    // The same take twice (a retried call): applied once, both answered as admitted.
    assert_eq!(take(4)["admitted"], true);
    assert_eq!(take(4)["admitted"], true);
    assert_eq!(consumed(), 3);

    // Another node's ids are its own.
    let (_, r) = post(
        d.port,
        "/v1/take",
        &json!({"subject": subject, "cost": 1, "quotas": quota(10), "node": "n2", "id": 3}),
    );
    assert_eq!(r["admitted"], true);
    assert_eq!(consumed(), 4);

    // Records live --take-record-ms (1 h by default), then go.
    let out = Command::new(redis.server.binaries().1)
        .args(["-p", &redis.port.to_string(), "pttl", &format!("km:{{{subject}}}:t")])
        .output()
        .unwrap();
    let ttl: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 3_600_000, "{ttl}");
}

/// Issue 10.17 on the store side: every key limitd writes for a subject (an anonymous
/// address churned once, say) has a TTL, so idle subjects expire from Redis too: the
/// node record after `--forget-node-ms` (7 days), a bucket once it would be full again (plus the
/// lease TTL and a minute), a quota period a day after its end.
#[test]
fn every_key_of_a_subject_expires() {
    let redis = Redis::start(&[]);
    let d = Limitd::single(&redis);
    let limits = json!({"buckets": [{"name": "s", "rate": 10, "interval_ms": 1000, "burst": 10}],
                        "quotas": quota(100)});
    for i in 0..20 {
        let subject = format!("ip:203.0.113.{i}");
        let mut n = Node::new("n", 1, 10);
        n.refill(d.port, &subject, &limits).unwrap();
        let mut b = json!({"subject": subject, "cost": 1});
        for (k, v) in limits.as_object().unwrap() {
            b[k] = v.clone();
        }
        assert_eq!(post(d.port, "/v1/take", &b).1["admitted"], true);
        n.release(d.port, &subject, &limits);
    }
    let cli = |args: &[&str]| {
        let out = Command::new(redis.server.binaries().1)
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let keys: Vec<String> = cli(&["--scan"]).lines().map(str::to_string).collect();
    assert_eq!(
        keys.len(),
        20 * 3,
        "node record, bucket, quota period per address: {keys:?}"
    );
    let month_end_ms = period_bounds(Period::Month, (now_ms() / 1000) as i64).1 as u64 * 1000;
    for k in &keys {
        let ttl: i64 = cli(&["pttl", k]).trim().parse().unwrap();
        assert!(ttl > 0, "{k} never expires ({ttl})");
        let limit_ms = if k.contains(":q:") {
            month_end_ms - now_ms() + 86_400_000
        } else if k.ends_with(":n") {
            7 * 86_400_000 // limitd's default --forget-node-ms
        } else {
            3_600_000
        };
        assert!(ttl as u64 <= limit_ms + 1_000, "{k}: ttl {ttl} ms > {limit_ms}");
    }
}

/// The key scenarios on Valkey (same functions, valkey-server instead of redis-server).
mod valkey {
    use super::on_valkey;

    #[test]
    fn grants_shrink_to_one_near_the_quota_and_never_exceed_it() {
        on_valkey(super::grants_shrink_to_one_near_the_quota_and_never_exceed_it);
    }
    #[test]
    fn returned_units_come_back_and_reports_count_once() {
        on_valkey(super::returned_units_come_back_and_reports_count_once);
    }
    #[test]
    fn replayed_and_reordered_calls_change_nothing() {
        on_valkey(super::replayed_and_reordered_calls_change_nothing);
    }
    #[test]
    fn a_dead_nodes_lease_comes_back_after_its_ttl() {
        on_valkey(super::a_dead_nodes_lease_comes_back_after_its_ttl);
    }
    #[test]
    fn a_killed_nodes_unreported_spend_is_never_admitted_twice() {
        on_valkey(super::a_killed_nodes_unreported_spend_is_never_admitted_twice);
    }
    #[test]
    fn quota_is_never_exceeded_by_concurrent_nodes() {
        on_valkey(super::quota_is_never_exceeded_by_concurrent_nodes);
    }
    #[test]
    fn token_bucket_is_shared_across_nodes() {
        on_valkey(super::token_bucket_is_shared_across_nodes);
    }
    #[test]
    fn redis_outage_costs_one_timeout_and_recovers_without_restart() {
        on_valkey(super::redis_outage_costs_one_timeout_and_recovers_without_restart);
    }
    #[test]
    fn quota_periods_are_the_cores_utc_calendar_periods() {
        on_valkey(super::quota_periods_are_the_cores_utc_calendar_periods);
    }
    #[test]
    fn works_on_a_cluster() {
        on_valkey(super::works_on_a_redis_cluster);
    }
    #[test]
    fn take_is_all_or_nothing_and_never_exceeds_the_quota() {
        on_valkey(super::take_is_all_or_nothing_and_never_exceeds_the_quota);
    }
    #[test]
    fn every_key_of_a_subject_expires() {
        on_valkey(super::every_key_of_a_subject_expires);
    }
    #[test]
    fn a_take_whose_answer_was_lost_is_settled_exactly_once() {
        on_valkey(super::a_take_whose_answer_was_lost_is_settled_exactly_once);
    }
    #[test]
    fn runs_on_valkey() {
        on_valkey(|| {
            let v = super::Redis::start(&[]);
            let out = std::process::Command::new(v.server.binaries().1)
                .args(["-p", &v.port.to_string(), "info", "server"])
                .output()
                .unwrap();
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("server_name:valkey"),
                "not a Valkey server"
            );
        });
    }
}
