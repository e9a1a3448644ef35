//! End-to-end tests of the `keymeter` CLI: the built binary in a temp dir, and admin
//! calls against a tiny fake HTTP server.

use keymeter::core::auth::api_key::{hash_key, ApiKey};
use keymeter::core::time::parse_rfc3339;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_keymeter");

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn file(&self) -> PathBuf {
        self.0.join("keyset.json")
    }
    fn read(&self) -> String {
        std::fs::read_to_string(self.file()).unwrap()
    }
    fn doc(&self) -> Value {
        serde_json::from_str(&self.read()).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

fn km_env(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(&dir.0)
        .env_remove("KEYMETER_ADMIN")
        .env_remove("KEYMETER_ADMIN_TOKEN");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn km(dir: &TempDir, args: &[&str]) -> Run {
    km_env(dir, args, &[])
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A directory with `keyset.json` holding plans "free" and "pro".
fn setup(name: &str) -> TempDir {
    let d = TempDir::new(name);
    km(&d, &["keyset", "init", "--plan", "free", "--plan", "pro"]).ok();
    d
}

/// Creates a key; returns (id, key).
fn create(d: &TempDir, extra: &[&str]) -> (String, String) {
    let mut args = vec!["--json", "key", "create", "--consumer", "acme", "--plan", "free"];
    args.extend_from_slice(extra);
    let v = km(d, &args).ok().json();
    (
        v["id"].as_str().unwrap().to_string(),
        v["key"].as_str().unwrap().to_string(),
    )
}

fn key_by_id<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id)
        .unwrap_or_else(|| panic!("no key {id}"))
}

#[test]
fn init_refuses_to_overwrite() {
    let d = TempDir::new("init");
    let r = km(&d, &["keyset", "init"]).ok();
    assert!(r.stdout.contains("version 1"), "{r:?}");
    assert_eq!(d.doc(), json!({"version": 1, "plans": {"default": {}}, "keys": []}));
    let r = km(&d, &["keyset", "init", "--plan", "x"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.starts_with("keymeter: ") && r.stderr.contains("--force"),
        "{r:?}"
    );
    assert_eq!(d.doc()["plans"], json!({"default": {}}));
    km(
        &d,
        &["keyset", "init", "--plan", "x", "--force", "--file", "keyset.json"],
    )
    .ok();
    assert_eq!(d.doc()["plans"], json!({"x": {}}));
}

#[test]
fn create_stores_only_the_hash_and_lists() {
    let d = setup("create");
    let r = km(
        &d,
        &[
            "--json",
            "key",
            "create",
            "--consumer",
            "acme",
            "--plan",
            "free",
            "--scope",
            "GET,HEAD:/v1/reports",
            "--scope",
            "/v2",
            "--cidr",
            "10.0.0.0/8",
            "--meta",
            "tier=gold",
            "--ttl",
            "30d",
        ],
    )
    .ok();
    let v = r.json();
    let key = v["key"].as_str().unwrap();
    let parsed = ApiKey::parse(key).expect("a valid key");
    assert_eq!(parsed.id(), v["id"]);
    assert_eq!(
        (v["consumer"].as_str(), v["plan"].as_str(), v["version"].as_u64()),
        (Some("acme"), Some("free"), Some(2))
    );
    let text = d.read();
    assert!(!text.contains(key), "the key itself must not be in the file");
    assert!(!text.contains(&key[16..]), "nor its secret");
    let doc = d.doc();
    assert_eq!(doc["version"], 2);
    let k = key_by_id(&doc, parsed.id());
    assert_eq!(k["hash"], hex::encode(hash_key(key)));
    assert_eq!(
        k["scopes"],
        json!([{"methods": ["GET", "HEAD"], "path_prefix": "/v1/reports"}, {"path_prefix": "/v2"}])
    );
    assert_eq!(k["cidrs"], json!(["10.0.0.0/8"]));
    assert_eq!(k["metadata"], json!({"tier": "gold"}));
    let exp = parse_rfc3339(k["expires_at"].as_str().unwrap()).unwrap();
    assert!((exp - (now() + 30 * 86_400)).abs() < 60);

    // human output: the key once, with the warning
    let r = km(&d, &["key", "create", "--consumer", "bob", "--plan", "pro"]).ok();
    let human_key = r.stdout.split_whitespace().find(|w| w.starts_with("km_")).unwrap();
    assert!(ApiKey::parse(human_key).is_ok());
    assert!(r.stdout.contains("cannot be shown again"));
    assert_eq!(d.doc()["version"], 3);

    let r = km(&d, &["key", "list"]).ok();
    assert!(r.stdout.starts_with("ID"), "{r:?}");
    assert!(r.stdout.contains(parsed.id()) && r.stdout.contains("acme") && r.stdout.contains("enabled"));
    assert!(
        !r.stdout.contains(k["hash"].as_str().unwrap()),
        "no hashes in human mode"
    );
    let list = km(&d, &["key", "list", "--json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["state"], "enabled");
    assert_eq!(list[0]["enabled"], true);

    let r = km(&d, &["keyset", "validate"]).ok();
    assert_eq!(r.stdout.trim(), "ok: 2 keys, 2 plans, version 3");
}

#[test]
fn disable_enable_and_states() {
    let d = setup("disable");
    let (id, _) = create(&d, &[]);
    let (expired, _) = create(&d, &["--expires", "2001-01-01T00:00:00Z"]);
    let (future, _) = create(&d, &["--not-before", "2099-01-01T00:00:00Z"]);
    let state = |id: &str| {
        let list = km(&d, &["--json", "key", "list"]).ok().json();
        list.as_array().unwrap().iter().find(|k| k["id"] == id).unwrap()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(state(&expired), "expired");
    assert_eq!(state(&future), "not yet valid");
    let r = km(&d, &["key", "disable", &id]).ok();
    assert!(r.stdout.contains("disabled"));
    assert_eq!(d.doc()["version"], 5);
    assert_eq!(key_by_id(&d.doc(), &id)["enabled"], false);
    assert_eq!(state(&id), "disabled");
    assert!(km(&d, &["key", "list"]).ok().stdout.contains("not yet valid"));
    let v = km(&d, &["key", "enable", &id, "--json"]).ok().json();
    assert_eq!(v, json!({"id": id, "enabled": true, "version": 6}));
    assert!(
        key_by_id(&d.doc(), &id).get("enabled").is_none(),
        "enabled is the default and not written"
    );
    assert_eq!(state(&id), "enabled");
    let r = km(&d, &["key", "disable", "Zz0000000000"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no key with id Zz0000000000"));
    assert_eq!(d.doc()["version"], 6);
}

#[test]
fn rotate_carries_lineage_and_sets_overlap() {
    let d = setup("rotate");
    let (old, old_key) = create(
        &d,
        &[
            "--scope",
            "GET:/v1",
            "--meta",
            "tier=gold",
            "--cidr",
            "10.1.0.0/16",
            "--expires",
            "2099-01-01T00:00:00Z",
        ],
    );
    let v = km(&d, &["--json", "key", "rotate", &old, "--overlap", "24h"])
        .ok()
        .json();
    let new = v["id"].as_str().unwrap().to_string();
    let new_key = v["key"].as_str().unwrap();
    assert!(ApiKey::parse(new_key).is_ok());
    assert_ne!(new_key, old_key);
    assert_eq!(v["lineage"], old.as_str());
    assert_eq!(v["replaces"], old.as_str());
    assert_eq!(v["version"], 3);
    let doc = d.doc();
    let (o, n) = (key_by_id(&doc, &old), key_by_id(&doc, &new));
    assert_eq!(n["lineage"], old.as_str());
    assert_eq!(n["hash"], hex::encode(hash_key(new_key)));
    for f in ["consumer", "plan", "scopes", "cidrs", "metadata"] {
        assert_eq!(n[f], o[f], "{f}");
    }
    assert!(n.get("expires_at").is_none());
    let exp = parse_rfc3339(o["expires_at"].as_str().unwrap()).unwrap();
    assert!((exp - (now() + 86_400)).abs() < 60, "old key expires after the overlap");
    assert!(!d.read().contains(new_key));

    // rotating the successor keeps the original lineage; an earlier expiry is kept
    let (soon, _) = create(&d, &["--ttl", "1h"]);
    let soon_exp = key_by_id(&d.doc(), &soon)["expires_at"].clone();
    let v = km(&d, &["--json", "key", "rotate", &new, "--overlap", "1h"])
        .ok()
        .json();
    assert_eq!(v["lineage"], old.as_str());
    km(&d, &["key", "rotate", &soon, "--overlap", "7d"]).ok();
    assert_eq!(key_by_id(&d.doc(), &soon)["expires_at"], soon_exp);
    km(&d, &["keyset", "validate"]).ok();
}

#[test]
fn revoke_and_set_plan() {
    let d = setup("revoke");
    let (a, _) = create(&d, &[]);
    let (b, _) = create(&d, &[]);
    let v = km(&d, &["--json", "key", "set-plan", &a, "pro"]).ok().json();
    assert_eq!(v, json!({"id": a, "plan": "pro", "version": 4}));
    assert_eq!(key_by_id(&d.doc(), &a)["plan"], "pro");
    let r = km(&d, &["key", "set-plan", &a, "gold"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("unknown plan 'gold'"), "{r:?}");
    km(&d, &["key", "revoke", &a]).ok();
    let doc = d.doc();
    assert_eq!(doc["version"], 5);
    assert_eq!(doc["keys"].as_array().unwrap().len(), 1);
    assert_eq!(doc["keys"][0]["id"], b.as_str());
    assert_eq!(km(&d, &["key", "revoke", &a]).code, 1);
}

#[test]
fn validate_reports_entry_and_field() {
    let d = setup("validate");
    create(&d, &[]);
    let mut doc = d.doc();
    doc["keys"][0]["hash"] = json!("not-a-hash");
    std::fs::write(d.file(), serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let r = km(&d, &["keyset", "validate"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.starts_with("keymeter: "));
    assert!(r.stderr.contains("keys[0]") && r.stderr.contains(".hash:"), "{r:?}");
    assert!(r.stdout.is_empty());
    // a mutation on an invalid file is refused and writes nothing
    let before = d.read();
    assert_eq!(km(&d, &["key", "create", "--consumer", "x", "--plan", "free"]).code, 1);
    assert_eq!(d.read(), before);
    std::fs::write(d.0.join("other.json"), "{\"version\": 1, \"kyes\": []}").unwrap();
    let r = km(&d, &["keyset", "validate", "other.json"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("other.json") && r.stderr.contains("unknown field"),
        "{r:?}"
    );
    assert_eq!(km(&d, &["keyset", "validate", "missing.json"]).code, 1);
}

#[test]
fn bad_plan_leaves_the_file_unchanged() {
    let d = setup("badplan");
    create(&d, &[]);
    let before = d.read();
    let r = km(&d, &["key", "create", "--consumer", "acme", "--plan", "gold"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("keys[1]") && r.stderr.contains(".plan: unknown plan 'gold'"),
        "{r:?}"
    );
    assert!(!r.stdout.contains("km_") && !r.stderr.contains("km_"));
    assert_eq!(d.read(), before);
    let r = km(&d, &["key", "create", "--consumer", "a b", "--plan", "free"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains(".consumer:"));
    assert_eq!(d.read(), before);
}

#[test]
fn usage_errors_exit_2() {
    let d = setup("usage");
    let (id, key) = create(&d, &[]);
    let before = d.read();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["key"],
        &["key", "create", "--plan", "free"],
        &[
            "key",
            "create",
            "--consumer",
            "a",
            "--plan",
            "free",
            "--scope",
            "reports",
        ],
        &[
            "key",
            "create",
            "--consumer",
            "a",
            "--plan",
            "free",
            "--scope",
            "get:/v1",
        ],
        &[
            "key",
            "create",
            "--consumer",
            "a",
            "--plan",
            "free",
            "--meta",
            "novalue",
        ],
        &["key", "create", "--consumer", "a", "--plan", "free", "--ttl", "5w"],
        &[
            "key",
            "create",
            "--consumer",
            "a",
            "--plan",
            "free",
            "--expires",
            "tomorrow",
        ],
        &[
            "key",
            "create",
            "--consumer",
            "a",
            "--plan",
            "free",
            "--ttl",
            "1d",
            "--expires",
            "2030-01-01T00:00:00Z",
        ],
        &["key", "create", "--consumer", "a", "--plan", "free", "--push"],
        &["key", "rotate", &id],
        &["key", "disable", "short"],
        &["key", "disable", &id, "--push"],
        &["key", "disable", &id, "--push", "--admin", "https://example.com"],
        &["status"],
        &["keyset", "push"],
    ];
    for args in cases {
        let r = km(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(
            r.stderr.starts_with("keymeter: ") || r.stderr.starts_with("Usage") || r.stderr.contains("Usage:"),
            "{r:?}"
        );
    }
    assert_eq!(d.read(), before, "usage errors change nothing");
    // a full key given by mistake is never echoed back
    for args in [vec!["key", "revoke", key.as_str()], vec!["key", "create", key.as_str()]] {
        let r = km(&d, &args);
        assert_eq!(r.code, 2, "{r:?}");
        assert!(!r.stderr.contains(&key) && !r.stdout.contains(&key), "{r:?}");
    }
    assert_eq!(d.read(), before);
    for args in [
        &["--help"][..],
        &["key", "create", "--help"],
        &["keyset", "push", "--help"],
        &["status", "--help"],
    ] {
        let r = km(&d, args).ok();
        assert!(r.stdout.contains("Usage:"), "{r:?}");
    }
}

// ----------------------------------------------------------------- admin API

#[derive(Debug)]
struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

struct Reply {
    status: u16,
    body: String,
    chunked: bool,
}

fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        body: body.to_string(),
        chunked: false,
    }
}

/// Serves one canned reply per connection, in order; returns the base URL and a handle
/// that yields the recorded requests.
fn fake_server(replies: Vec<Reply>) -> (String, JoinHandle<Vec<Req>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for r in replies {
            let stream = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => panic!("fake server: no connection: {e}"),
                }
            };
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse::<usize>().unwrap());
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            seen.push(Req {
                method,
                path,
                headers,
                body,
            });
            let mut out = stream;
            let reason = if r.status == 200 { "OK" } else { "Conflict" };
            let ctype = if r.status >= 400 {
                "application/problem+json"
            } else {
                "application/json"
            };
            let mut resp = format!(
                "HTTP/1.1 {} {reason}\r\nContent-Type: {ctype}\r\nConnection: close\r\n",
                r.status
            );
            if r.chunked {
                let (a, b) = r.body.split_at(r.body.len() / 2);
                resp.push_str("Transfer-Encoding: chunked\r\n\r\n");
                for part in [a, b] {
                    resp.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
                }
                resp.push_str("0\r\n\r\n");
            } else {
                resp.push_str(&format!("Content-Length: {}\r\n\r\n{}", r.body.len(), r.body));
            }
            out.write_all(resp.as_bytes()).unwrap();
        }
        seen
    });
    (url, handle)
}

fn stale() -> Reply {
    reply(
        409,
        json!({"type": "urn:keymeter:problem:stale-version", "title": "Key-set version is not newer than the running one",
               "status": 409, "detail": "running version 9, got 3"}),
    )
}

#[test]
fn keyset_push_sends_the_file() {
    let d = setup("push");
    create(&d, &[]);
    let (url, server) = fake_server(vec![reply(200, json!({"version": 2, "keys": 1})), stale()]);
    let r = km(&d, &["keyset", "push", "--admin", &url, "--token", "s3cret"]).ok();
    assert!(
        r.stdout.contains("pushed keyset.json") && r.stdout.contains("keys=1"),
        "{r:?}"
    );
    let r = km_env(
        &d,
        &["keyset", "push", "--force"],
        &[("KEYMETER_ADMIN", &url), ("KEYMETER_ADMIN_TOKEN", "envtok")],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("409") && r.stderr.contains("not newer than the running one"),
        "{r:?}"
    );
    assert!(r.stderr.contains("running version 9, got 3"), "{r:?}");
    let reqs = server.join().unwrap();
    assert_eq!((reqs[0].method.as_str(), reqs[0].path.as_str()), ("PUT", "/v1/keyset"));
    assert_eq!(reqs[0].header("authorization"), Some("Bearer s3cret"));
    assert_eq!(reqs[0].header("content-type"), Some("application/json"));
    assert_eq!(reqs[0].body, d.read().as_bytes());
    assert_eq!(
        (reqs[1].method.as_str(), reqs[1].path.as_str()),
        ("PUT", "/v1/keyset?force=true")
    );
    assert_eq!(reqs[1].header("authorization"), Some("Bearer envtok"));
}

#[test]
fn mutations_push_deltas() {
    let d = setup("delta");
    let ok = || reply(200, json!({"version": 0}));
    let (url, server) = fake_server(vec![ok(), ok(), ok(), ok(), ok()]);
    let admin = ["--push", "--admin", url.as_str(), "--token", "tok"];
    let mut args = vec!["--json", "key", "create", "--consumer", "acme", "--plan", "free"];
    args.extend(admin);
    let v = km(&d, &args).ok().json();
    assert_eq!(v["pushed"], true);
    let id = v["id"].as_str().unwrap().to_string();
    let run = |cmd: &[&str]| {
        let mut a = cmd.to_vec();
        a.extend(admin);
        km(&d, &a).ok()
    };
    run(&["key", "disable", &id]);
    run(&["key", "set-plan", &id, "pro"]);
    let r = run(&["key", "rotate", &id, "--overlap", "1h"]);
    assert!(r.stdout.contains("pushed to"), "{r:?}");
    run(&["key", "revoke", &id]);
    let reqs = server.join().unwrap();
    assert_eq!(reqs.len(), 5);
    for r in &reqs {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/v1/keyset/delta"));
        assert_eq!(r.header("authorization"), Some("Bearer tok"));
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let doc = d.doc();
    let create = reqs[0].json();
    assert_eq!(create["version"], 2);
    assert_eq!(create["ops"].as_array().unwrap().len(), 1);
    assert_eq!(create["ops"][0]["op"], "upsert");
    assert_eq!(create["ops"][0]["key"]["id"], id.as_str());
    assert_eq!(create["ops"][0]["key"]["consumer"], "acme");
    assert_eq!(create["ops"][0]["key"]["hash"].as_str().unwrap().len(), 64);
    assert_eq!(
        reqs[1].json(),
        json!({"version": 3, "ops": [{"op": "disable", "id": id}]})
    );
    let set_plan = reqs[2].json();
    assert_eq!(
        (set_plan["version"].as_u64(), set_plan["ops"][0]["op"].as_str()),
        (Some(4), Some("upsert"))
    );
    assert_eq!(set_plan["ops"][0]["key"]["plan"], "pro");
    assert_eq!(set_plan["ops"][0]["key"]["enabled"], false);
    let rotate = reqs[3].json();
    assert_eq!(rotate["version"], 5);
    let ops = rotate["ops"].as_array().unwrap();
    assert_eq!(ops.len(), 2);
    assert!(ops.iter().all(|o| o["op"] == "upsert"));
    assert_eq!(ops[0]["key"]["lineage"], id.as_str());
    assert_eq!(ops[1]["key"]["id"], id.as_str());
    assert!(ops[1]["key"]["expires_at"].is_string());
    assert_eq!(
        reqs[4].json(),
        json!({"version": 6, "ops": [{"op": "revoke", "id": id}]})
    );
    assert_eq!(doc["version"], 6);
}

#[test]
fn failed_push_keeps_the_file_change_and_exits_1() {
    let d = setup("pushfail");
    let (url, server) = fake_server(vec![stale()]);
    let r = km(
        &d,
        &[
            "key",
            "create",
            "--consumer",
            "acme",
            "--plan",
            "free",
            "--push",
            "--admin",
            &url,
        ],
    );
    assert_eq!(r.code, 1, "{r:?}");
    // the key is still shown (it is in the file), and the error says what to do
    let key = r
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("km_"))
        .expect("key printed");
    assert!(ApiKey::parse(key).is_ok());
    assert!(
        r.stderr.contains("push failed") && r.stderr.contains("keyset push"),
        "{r:?}"
    );
    assert!(r.stderr.contains("not newer than the running one"));
    assert!(!r.stderr.contains(key));
    assert_eq!(d.doc()["version"], 2);
    assert_eq!(d.doc()["keys"][0]["hash"], hex::encode(hash_key(key)));
    let reqs = server.join().unwrap();
    assert!(reqs[0].header("authorization").is_none(), "no token, no header");
    // nobody listening: also exit 1 with the file changed
    let (id, _) = create(&d, &[]);
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let r = km(&d, &["--json", "key", "disable", &id, "--push", "--admin", &dead]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.json()["pushed"], false);
    assert!(r.stderr.contains("cannot reach admin API"), "{r:?}");
    assert_eq!(key_by_id(&d.doc(), &id)["enabled"], false);
}

#[test]
fn status_human_and_json() {
    let d = TempDir::new("status");
    let body =
        json!({"loaded": true, "version": 7, "keys": 3, "plans": ["free", "pro"], "last_update": {"source": "push"}});
    let (url, server) = fake_server(vec![
        Reply {
            status: 200,
            body: body.to_string(),
            chunked: true,
        },
        Reply {
            status: 200,
            body: body.to_string(),
            chunked: false,
        },
        reply(
            401,
            json!({"title": "Admin token required", "detail": "Send Authorization: Bearer <admin token>."}),
        ),
    ]);
    let r = km_env(
        &d,
        &["status"],
        &[("KEYMETER_ADMIN", &url), ("KEYMETER_ADMIN_TOKEN", "t0k")],
    )
    .ok();
    for line in [
        "loaded=true",
        "version=7",
        "keys=3",
        "plans[0]=free",
        "plans[1]=pro",
        "last_update.source=push",
    ] {
        assert!(r.stdout.lines().any(|l| l == line), "{line}: {r:?}");
    }
    let r = km(&d, &["status", "--json", "--admin", &url]).ok();
    assert_eq!(r.json(), body);
    let r = km(&d, &["status", "--admin", &url]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("401") && r.stderr.contains("Admin token required"),
        "{r:?}"
    );
    let reqs = server.join().unwrap();
    assert_eq!((reqs[0].method.as_str(), reqs[0].path.as_str()), ("GET", "/v1/status"));
    assert_eq!(reqs[0].header("authorization"), Some("Bearer t0k"));
    assert!(reqs[0].body.is_empty() && reqs[0].header("content-length").is_none());
}

// ----------------------------------------------------------------- usage

/// One usage item as the admin API reports it.
fn uitem(lineage: &str, key_id: &str, consumer: &str, plan: &str, admitted: u64, denied: [u64; 4], cost: u64) -> Value {
    json!({
        "lineage": lineage, "key_id": key_id, "consumer": consumer, "plan": plan,
        "requests": {"admitted": admitted, "unauthorized": denied[0], "forbidden": denied[1],
                     "rate_limited": denied[2], "quota_exceeded": denied[3]},
        "responses": {"1xx": 0, "2xx": admitted, "3xx": 0, "4xx": denied.iter().sum::<u64>(), "5xx": 0},
        "request_bytes": 10 * admitted, "response_bytes": 100 * admitted, "cost_units": cost,
    })
}

fn upage(instance: &str, items: Vec<Value>, next: Option<u64>) -> Reply {
    Reply {
        status: 200,
        body:
            json!({"instance_id": instance, "started_at": "2030-01-01T00:00:00Z", "items": items, "next_cursor": next})
                .to_string(),
        chunked: next.is_some(),
    }
}

fn row<'a>(v: &'a Value, field: &str, name: &str) -> &'a Value {
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[field] == name)
        .unwrap_or_else(|| panic!("no row {field}={name}: {v}"))
}

#[test]
fn usage_pages_and_sums_two_envoys() {
    let d = TempDir::new("usage-sum");
    // Envoy 1 answers in two pages; Envoy 2 in one. Three runs: json, csv by key, table by plan.
    let e1_pages = || {
        [
            upage(
                "aaaa000000000001",
                vec![
                    uitem("L1", "L1", "acme", "free", 5, [0, 0, 1, 0], 5),
                    uitem("L2", "L2", "zeta", "pro", 1, [1, 2, 0, 3], 2),
                ],
                Some(1000),
            ),
            upage(
                "aaaa000000000001",
                vec![uitem("L3", "K3", "acme", "pro", 4, [0, 0, 0, 0], 8)],
                None,
            ),
        ]
    };
    let e2_page = || {
        upage(
            "bbbb000000000002",
            vec![uitem("L1", "L1", "acme", "free", 2, [1, 0, 0, 0], 2)],
            None,
        )
    };
    let (e1, s1) = fake_server(e1_pages().into_iter().chain(e1_pages()).chain(e1_pages()).collect());
    let (e2, s2) = fake_server(vec![e2_page(), e2_page(), e2_page()]);

    let v = km(
        &d,
        &["usage", "--json", "--admin", &e1, "--admin", &e2, "--token", "tok"],
    )
    .ok()
    .json();
    assert_eq!(v["by"], "consumer");
    assert_eq!(v["mode"], "cumulative");
    let acme = row(&v, "consumer", "acme");
    assert_eq!(
        (
            &acme["admitted"],
            &acme["denied"],
            &acme["unauthorized"],
            &acme["rate_limited"]
        ),
        (&json!(11), &json!(2), &json!(1), &json!(1))
    );
    assert_eq!((&acme["cost_units"], &acme["request_bytes"]), (&json!(15), &json!(110)));
    assert_eq!(acme["response_bytes"], 1100);
    assert_eq!(acme["responses"]["2xx"], 11);
    let zeta = row(&v, "consumer", "zeta");
    assert_eq!(
        (&zeta["denied"], &zeta["forbidden"], &zeta["quota_exceeded"]),
        (&json!(6), &json!(2), &json!(3))
    );
    assert_eq!(v["rows"].as_array().unwrap().len(), 2);
    assert_eq!(v["totals"]["admitted"], 12);
    assert_eq!(
        v["instances"],
        json!([
            {"admin": e1, "instance_id": "aaaa000000000001", "started_at": "2030-01-01T00:00:00Z", "lineages": 3},
            {"admin": e2, "instance_id": "bbbb000000000002", "started_at": "2030-01-01T00:00:00Z", "lineages": 1},
        ])
    );

    let r = km(
        &d,
        &[
            "usage",
            "--format",
            "csv",
            "--by",
            "key",
            "--admin",
            &e1,
            "--admin",
            &e2,
            "--consumer",
            "acme",
        ],
    )
    .ok();
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(
        lines[0].starts_with("lineage,key_ids,consumer,plan,admitted,denied,unauthorized,forbidden,rate_limited,"),
        "{r:?}"
    );
    assert_eq!(lines.len(), 4, "{r:?}");
    assert!(lines[1].starts_with("L1,L1,acme,free,7,2,1,0,1,0,7,70,700,"), "{r:?}");
    assert!(lines[3].starts_with("L3,K3,acme,pro,4,0,"), "{r:?}");

    let r = km_env(
        &d,
        &["usage", "--by", "plan", "--admin", &e1, "--admin", &e2],
        &[("KEYMETER_ADMIN_TOKEN", "envtok")],
    )
    .ok();
    let cells = |first: &str| -> Vec<String> {
        let line = r
            .stdout
            .lines()
            .find(|l| l.starts_with(first))
            .unwrap_or_else(|| panic!("{first}: {r:?}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(
        cells("PLAN"),
        [
            "PLAN",
            "ADMITTED",
            "DENIED",
            "COST_UNITS",
            "REQUEST_BYTES",
            "RESPONSE_BYTES"
        ]
    );
    assert_eq!(cells("free"), ["free", "7", "2", "7", "70", "700"]);
    assert_eq!(cells("pro"), ["pro", "5", "6", "10", "50", "500"]);
    assert_eq!(cells("(total)"), ["(total)", "12", "8", "17", "120", "1200"]);
    assert!(
        r.stdout.contains("aaaa000000000001") && r.stdout.contains("from 2 Envoy(s)"),
        "{r:?}"
    );

    let reqs = s1.join().unwrap();
    let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/usage?cursor=0&limit=1000",
            "/v1/usage?cursor=1000&limit=1000",
            "/v1/usage?cursor=0&limit=1000&consumer=acme",
            "/v1/usage?cursor=1000&limit=1000&consumer=acme",
            "/v1/usage?cursor=0&limit=1000",
            "/v1/usage?cursor=1000&limit=1000",
        ]
    );
    assert!(reqs.iter().all(|r| r.method == "GET"));
    assert_eq!(reqs[0].header("authorization"), Some("Bearer tok"));
    assert_eq!(reqs[1].header("authorization"), Some("Bearer tok"));
    assert!(reqs[2].header("authorization").is_none());
    assert_eq!(reqs[4].header("authorization"), Some("Bearer envtok"));
    let reqs = s2.join().unwrap();
    assert_eq!(reqs[0].header("authorization"), Some("Bearer tok"));
    assert_eq!(reqs[1].path, "/v1/usage?cursor=0&limit=1000&consumer=acme");
}

#[test]
fn usage_since_file_prints_only_the_change() {
    let d = TempDir::new("usage-since");
    let (e1, s1) = fake_server(vec![
        upage(
            "aaaa000000000001",
            vec![uitem("L1", "L1", "acme", "free", 5, [0, 0, 1, 0], 5)],
            None,
        ),
        upage(
            "aaaa000000000001",
            vec![
                uitem("L1", "L1", "acme", "free", 8, [0, 0, 1, 0], 9),
                uitem("L2", "L2", "zeta", "free", 1, [0; 4], 1),
            ],
            None,
        ),
        upage(
            "aaaa000000000001",
            vec![
                uitem("L1", "L1", "acme", "free", 8, [0, 0, 1, 0], 9),
                uitem("L2", "L2", "zeta", "free", 1, [0; 4], 1),
            ],
            None,
        ),
    ]);
    let (e2, s2) = fake_server(vec![
        upage(
            "bbbb000000000002",
            vec![uitem("L1", "L1", "acme", "free", 3, [0; 4], 3)],
            None,
        ),
        // restarted: a new instance id, counting from zero again
        upage(
            "cccc000000000003",
            vec![uitem("L1", "L1", "acme", "free", 2, [0; 4], 2)],
            None,
        ),
        upage(
            "cccc000000000003",
            vec![uitem("L1", "L1", "acme", "free", 2, [0; 4], 2)],
            None,
        ),
    ]);
    let run = || {
        km(
            &d,
            &[
                "usage",
                "--json",
                "--since-file",
                "billing.json",
                "--admin",
                &e1,
                "--admin",
                &e2,
            ],
        )
    };
    // first run: no file yet, everything counts
    let r = run().ok();
    let v = r.json();
    assert_eq!(v["mode"], "since");
    assert_eq!(row(&v, "consumer", "acme")["admitted"], 8);
    assert_eq!(v["instances"][0]["new_instance"], true);
    let state: Value = serde_json::from_str(&std::fs::read_to_string(d.0.join("billing.json")).unwrap()).unwrap();
    assert_eq!(state["instances"]["aaaa000000000001"]["admin"], e1.as_str());
    assert_eq!(
        state["instances"]["aaaa000000000001"]["lineages"]["L1"]["requests"]["admitted"],
        5
    );

    // second run: e1 grew, e2 restarted
    let r = run().ok();
    let v = r.json();
    let acme = row(&v, "consumer", "acme");
    assert_eq!((&acme["admitted"], &acme["cost_units"]), (&json!(3 + 2), &json!(4 + 2)));
    assert_eq!(acme["rate_limited"], 0);
    assert_eq!(row(&v, "consumer", "zeta")["admitted"], 1);
    assert_eq!(v["instances"][0]["new_instance"], false);
    assert_eq!(v["instances"][1]["restarted"], true);
    assert_eq!(v["instances"][1]["previous_instance_ids"], json!(["bbbb000000000002"]));
    assert!(
        r.stderr.contains("restarted") && r.stderr.contains("cccc000000000003"),
        "{r:?}"
    );
    let state: Value = serde_json::from_str(&std::fs::read_to_string(d.0.join("billing.json")).unwrap()).unwrap();
    assert!(state["instances"].get("bbbb000000000002").is_none());

    // third run: nothing new
    let v = run().ok().json();
    assert_eq!(v["rows"], json!([]));
    assert_eq!(v["totals"]["admitted"], 0);
    s1.join().unwrap();
    s2.join().unwrap();

    // a broken state file fails before any request, and is left alone
    std::fs::write(d.0.join("billing.json"), "{\"format\": 1, \"instances\": 3}").unwrap();
    let r = km(
        &d,
        &["usage", "--since-file", "billing.json", "--admin", "http://127.0.0.1:9"],
    );
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("billing.json") && r.stderr.contains("usage state"),
        "{r:?}"
    );
    assert_eq!(
        std::fs::read_to_string(d.0.join("billing.json")).unwrap(),
        "{\"format\": 1, \"instances\": 3}"
    );
}

#[test]
fn usage_errors() {
    let d = TempDir::new("usage-errors");
    let same = || upage("aaaa000000000001", vec![], None);
    let (a, sa) = fake_server(vec![
        same(),
        reply(
            401,
            json!({"title": "Admin token required", "detail": "Send Authorization: Bearer <admin token>."}),
        ),
    ]);
    let (b, sb) = fake_server(vec![same()]);
    let r = km(&d, &["usage", "--admin", &a, "--admin", &b]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("same Envoy") && r.stderr.contains("counted twice"),
        "{r:?}"
    );
    assert!(r.stdout.is_empty());
    let r = km(&d, &["usage", "--admin", &a, "--token", "wrong"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("401") && r.stderr.contains("Admin token required") && r.stderr.contains("--token"),
        "{r:?}"
    );
    sa.join().unwrap();
    sb.join().unwrap();
    for args in [
        &["usage"][..],
        &["usage", "--admin", "http://h:1", "--json", "--format", "csv"],
        &["usage", "--admin", "http://h:1", "--by", "lineage"],
        &["--admin", "http://h:1", "usage", "--admin", "http://h:2"],
        &["status", "--admin", "http://h:1", "--admin", "http://h:2"],
    ] {
        let r = km(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(r.stderr.starts_with("keymeter: "), "{r:?}");
    }
    let r = km(&d, &["usage", "--help"]).ok();
    assert!(
        r.stdout.contains("--since-file") && r.stdout.contains("restart"),
        "{r:?}"
    );
}

#[test]
fn keyset_push_sends_large_files_as_a_staged_upload() {
    let d = setup("staged");
    for _ in 0..5 {
        create(&d, &[]);
    }
    let doc = d.doc();
    let begun = || reply(201, json!({"upload_id": "up7"}));
    let so_far = |n: u64| reply(200, json!({"keys_so_far": n}));
    let bad = reply(
        400,
        json!({"type": "urn:keymeter:problem:invalid-keyset", "title": "Invalid key set", "status": 400,
               "detail": "keys[3].hash: bad (upload aborted)"}),
    );
    let (url, server) = fake_server(vec![
        begun(),
        so_far(2),
        so_far(4),
        so_far(5),
        reply(
            200,
            json!({"version": doc["version"], "keys": 5, "written": 5, "removed": 0}),
        ),
        // second run: the second chunk is refused, the CLI aborts the upload
        begun(),
        so_far(2),
        bad,
        reply(404, json!({"title": "No such key-set upload"})),
        // third run: at or under --chunk-keys, the one-shot PUT
        reply(200, json!({"version": 2, "keys": 5})),
    ]);
    let admin = ["--admin", url.as_str(), "--token", "tok"];
    let r = km(
        &d,
        &[&["keyset", "push", "--chunk-keys", "2", "--force"][..], &admin].concat(),
    )
    .ok();
    assert!(
        r.stdout.contains("pushed keyset.json") && r.stdout.contains("keys=5"),
        "{r:?}"
    );
    let r = km(&d, &[&["keyset", "push", "--chunk-keys", "2"][..], &admin].concat());
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("400") && r.stderr.contains("keys[3].hash"), "{r:?}");
    km(&d, &[&["keyset", "push", "--chunk-keys", "5"][..], &admin].concat()).ok();
    let reqs = server.join().unwrap();
    let seq: Vec<(&str, &str)> = reqs.iter().map(|r| (r.method.as_str(), r.path.as_str())).collect();
    assert_eq!(
        seq,
        [
            ("POST", "/v1/keyset/uploads"),
            ("PUT", "/v1/keyset/uploads/up7/keys"),
            ("PUT", "/v1/keyset/uploads/up7/keys"),
            ("PUT", "/v1/keyset/uploads/up7/keys"),
            ("POST", "/v1/keyset/uploads/up7/commit?force=true"),
            ("POST", "/v1/keyset/uploads"),
            ("PUT", "/v1/keyset/uploads/up7/keys"),
            ("PUT", "/v1/keyset/uploads/up7/keys"),
            ("DELETE", "/v1/keyset/uploads/up7"),
            ("PUT", "/v1/keyset"),
        ]
    );
    assert!(reqs.iter().all(|r| r.header("authorization") == Some("Bearer tok")));
    // the chunks are the file's keys in order; the commit carries version and plans
    let sent: Vec<Value> = reqs[1..4]
        .iter()
        .flat_map(|r| r.json().as_array().unwrap().clone())
        .collect();
    assert_eq!(&sent, doc["keys"].as_array().unwrap());
    assert_eq!(
        reqs[4].json(),
        json!({"version": doc["version"], "plans": doc["plans"]})
    );
}
