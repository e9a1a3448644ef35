//! `key create|revoke|disable|enable|rotate|set-plan|list`.
//!
//! Every mutation: change the document, bump its version, validate the whole document
//! with the core (nothing is written if that fails), write the file atomically, then,
//! with --push, send the change as a delta (`POST {admin}/v1/keyset/delta`).

use crate::admin_client::{Admin, BUSY_WAIT};
use crate::error::{failed, usage, Result};
use crate::keyfile::KeyFile;
use crate::output;
use crate::random;
use crate::Ctx;
use keymeter::core::auth::api_key::{assemble, hash_key, ID_LEN, SECRET_LEN};
use keymeter::core::keyset::document::{DeltaDoc, DeltaOp, KeyDoc, ScopeDoc};
use keymeter::core::time::{format_rfc3339, parse_rfc3339};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

const DELTA_API: &str = "/v1/keyset/delta";

/// What `key create` was asked for.
pub struct NewKey {
    pub consumer: String,
    pub plan: String,
    pub expires: Option<i64>,
    pub ttl: Option<i64>,
    pub not_before: Option<i64>,
    pub scopes: Vec<ScopeDoc>,
    pub cidrs: Vec<String>,
    pub meta: Vec<(String, String)>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn expiry(expires: Option<i64>, ttl: Option<i64>, now: i64) -> Option<i64> {
    expires.or(ttl.map(|t| now.saturating_add(t)))
}

/// A fresh key whose id is not in the file yet: (id, full key).
fn generate(kf: &KeyFile) -> Result<(String, String)> {
    let rnd = |n| random::base62(n).map_err(|e| failed(format!("cannot generate a key: {e}")));
    loop {
        let id = rnd(ID_LEN)?;
        if kf.doc.keys.iter().all(|k| k.id != id) {
            let key = assemble(&id, &rnd(SECRET_LEN)?);
            return Ok((id, key));
        }
    }
}

/// How a --push went.
enum Pushed {
    NotAsked,
    Done(String),
    Failed(String),
}

impl Pushed {
    fn json_field(&self, v: &mut Value) {
        match self {
            Pushed::NotAsked => {}
            Pushed::Done(_) => v["pushed"] = json!(true),
            Pushed::Failed(_) => v["pushed"] = json!(false),
        }
    }

    /// Human line for a successful push; the error for a failed one.
    fn finish(self, ctx: &Ctx, kf: &KeyFile) -> Result<()> {
        match self {
            Pushed::NotAsked => Ok(()),
            Pushed::Done(url) => {
                if !ctx.out.json {
                    println!("pushed to {url} (version {})", kf.doc.version);
                }
                Ok(())
            }
            Pushed::Failed(why) => Err(failed(format!(
                "push failed: {why}; {} has the change (version {}): run `keymeter keyset push` to bring Envoy in line",
                kf.path.display(),
                kf.doc.version
            ))),
        }
    }
}

/// The admin client if --push was given; checked before anything is changed.
fn push_target(ctx: &Ctx, push: bool) -> Result<Option<Admin>> {
    if push {
        ctx.admin("--push").map(Some)
    } else {
        Ok(None)
    }
}

/// Bumps the version, validates everything, writes the file, then pushes `ops`.
fn commit(kf: &mut KeyFile, ops: Vec<DeltaOp>, admin: Option<&Admin>) -> Result<Pushed> {
    kf.bump()?;
    kf.doc
        .compile()
        .map_err(|e| failed(format!("{}: {e} (file unchanged)", kf.path.display())))?;
    kf.save()?;
    let Some(admin) = admin else {
        return Ok(Pushed::NotAsked);
    };
    let delta = DeltaDoc {
        version: kf.doc.version,
        ops,
    };
    let body = serde_json::to_vec(&delta).expect("delta serializes");
    Ok(match admin.call_waiting("POST", DELTA_API, Some(&body), BUSY_WAIT) {
        Ok(r) if r.ok() => Pushed::Done(admin.url(DELTA_API)),
        Ok(r) => Pushed::Failed(format!("{} said {}", admin.url(DELTA_API), r.problem())),
        Err(e) => Pushed::Failed(e),
    })
}

fn print_new_key(kf: &KeyFile, doc: &KeyDoc, key: &str, headline: &str) {
    println!("{headline}");
    println!("  id:        {}", doc.id);
    println!("  consumer:  {}", doc.consumer);
    println!("  plan:      {}", doc.plan);
    if let Some(l) = &doc.lineage {
        println!("  lineage:   {l}");
    }
    if let Some(t) = &doc.not_before {
        println!("  valid from {t}");
    }
    println!("  expires:   {}", doc.expires_at.as_deref().unwrap_or("never"));
    println!("  {} version {}", kf.path.display(), kf.doc.version);
    println!();
    println!("  {key}");
    println!();
    println!(
        "Store it now: it cannot be shown again ({} keeps only its hash).",
        kf.path.display()
    );
}

pub fn create(ctx: &Ctx, path: &Path, push: bool, a: NewKey) -> Result<()> {
    let admin = push_target(ctx, push)?;
    let mut metadata = BTreeMap::new();
    for (k, v) in a.meta {
        if metadata.insert(k.clone(), v).is_some() {
            return Err(usage(format!("--meta {k} given twice")));
        }
    }
    let mut kf = KeyFile::load(path)?;
    let now = now();
    let expires = expiry(a.expires, a.ttl, now);
    if expires.is_some_and(|t| t <= now) {
        output::warn("the key's expiry is in the past: it will not work");
    }
    let (id, key) = generate(&kf)?;
    let doc = KeyDoc {
        id: id.clone(),
        hash: hex::encode(hash_key(&key)),
        consumer: a.consumer,
        plan: a.plan,
        enabled: true,
        not_before: a.not_before.map(format_rfc3339),
        expires_at: expires.map(format_rfc3339),
        scopes: a.scopes,
        cidrs: a.cidrs,
        metadata,
        lineage: None,
        limits: None,
    };
    kf.doc.keys.push(doc.clone());
    let pushed = commit(&mut kf, vec![DeltaOp::Upsert { key: doc.clone() }], admin.as_ref())?;
    if ctx.out.json {
        let mut v =
            json!({"id": id, "key": key, "consumer": doc.consumer, "plan": doc.plan, "version": kf.doc.version});
        pushed.json_field(&mut v);
        ctx.out.json(&v);
    } else {
        print_new_key(&kf, &doc, &key, "Created a new API key.");
    }
    pushed.finish(ctx, &kf)
}

pub fn revoke(ctx: &Ctx, id: &str, path: &Path, push: bool) -> Result<()> {
    let admin = push_target(ctx, push)?;
    let mut kf = KeyFile::load(path)?;
    let i = kf.find(id)?;
    kf.doc.keys.remove(i);
    let pushed = commit(&mut kf, vec![DeltaOp::Revoke { id: id.to_string() }], admin.as_ref())?;
    if ctx.out.json {
        let mut v = json!({"id": id, "revoked": true, "version": kf.doc.version});
        pushed.json_field(&mut v);
        ctx.out.json(&v);
    } else {
        println!("revoked key {id} ({} version {})", kf.path.display(), kf.doc.version);
    }
    pushed.finish(ctx, &kf)
}

pub fn set_enabled(ctx: &Ctx, id: &str, enabled: bool, path: &Path, push: bool) -> Result<()> {
    let admin = push_target(ctx, push)?;
    let mut kf = KeyFile::load(path)?;
    let i = kf.find(id)?;
    kf.doc.keys[i].enabled = enabled;
    let op = if enabled {
        DeltaOp::Enable { id: id.to_string() }
    } else {
        DeltaOp::Disable { id: id.to_string() }
    };
    let pushed = commit(&mut kf, vec![op], admin.as_ref())?;
    if ctx.out.json {
        let mut v = json!({"id": id, "enabled": enabled, "version": kf.doc.version});
        pushed.json_field(&mut v);
        ctx.out.json(&v);
    } else {
        let what = if enabled { "enabled" } else { "disabled" };
        println!("{what} key {id} ({} version {})", kf.path.display(), kf.doc.version);
    }
    pushed.finish(ctx, &kf)
}

pub fn set_plan(ctx: &Ctx, id: &str, plan: &str, path: &Path, push: bool) -> Result<()> {
    let admin = push_target(ctx, push)?;
    let mut kf = KeyFile::load(path)?;
    let i = kf.find(id)?;
    kf.doc.keys[i].plan = plan.to_string();
    let doc = kf.doc.keys[i].clone();
    let pushed = commit(&mut kf, vec![DeltaOp::Upsert { key: doc }], admin.as_ref())?;
    if ctx.out.json {
        let mut v = json!({"id": id, "plan": plan, "version": kf.doc.version});
        pushed.json_field(&mut v);
        ctx.out.json(&v);
    } else {
        println!(
            "key {id} is now on plan {plan} ({} version {})",
            kf.path.display(),
            kf.doc.version
        );
    }
    pushed.finish(ctx, &kf)
}

pub fn rotate(
    ctx: &Ctx,
    id: &str,
    overlap: i64,
    expires: Option<i64>,
    ttl: Option<i64>,
    path: &Path,
    push: bool,
) -> Result<()> {
    let admin = push_target(ctx, push)?;
    let mut kf = KeyFile::load(path)?;
    let i = kf.find(id)?;
    let now = now();
    let (new_id, key) = generate(&kf)?;
    let old = &mut kf.doc.keys[i];
    let new = KeyDoc {
        id: new_id.clone(),
        hash: hex::encode(hash_key(&key)),
        consumer: old.consumer.clone(),
        plan: old.plan.clone(),
        enabled: true,
        not_before: None,
        expires_at: expiry(expires, ttl, now).map(format_rfc3339),
        scopes: old.scopes.clone(),
        cidrs: old.cidrs.clone(),
        metadata: old.metadata.clone(),
        lineage: Some(old.lineage.clone().unwrap_or_else(|| old.id.clone())),
        limits: old.limits.clone(),
    };
    let cutoff = now.saturating_add(overlap);
    let keep_existing = old
        .expires_at
        .as_deref()
        .and_then(|t| parse_rfc3339(t).ok())
        .is_some_and(|t| t <= cutoff);
    if !keep_existing {
        old.expires_at = Some(format_rfc3339(cutoff));
    }
    let old = old.clone();
    kf.doc.keys.push(new.clone());
    let ops = vec![
        DeltaOp::Upsert { key: new.clone() },
        DeltaOp::Upsert { key: old.clone() },
    ];
    let pushed = commit(&mut kf, ops, admin.as_ref())?;
    let old_expiry = old.expires_at.clone().unwrap_or_default();
    if ctx.out.json {
        let mut v = json!({
            "id": new_id, "key": key, "consumer": new.consumer, "plan": new.plan, "version": kf.doc.version,
            "replaces": id, "lineage": new.lineage, "old_expires_at": old_expiry,
        });
        pushed.json_field(&mut v);
        ctx.out.json(&v);
    } else {
        let headline = format!("Rotated key {id}: it keeps working until {old_expiry}. Its replacement:");
        print_new_key(&kf, &new, &key, &headline);
    }
    pushed.finish(ctx, &kf)
}

/// A key's state at `now`.
fn state(k: &KeyDoc, now: i64) -> &'static str {
    let at = |t: &Option<String>| t.as_deref().map(parse_rfc3339);
    if !k.enabled {
        return "disabled";
    }
    match (at(&k.not_before), at(&k.expires_at)) {
        (Some(Err(_)), _) | (_, Some(Err(_))) => "invalid",
        (_, Some(Ok(e))) if now >= e => "expired",
        (Some(Ok(nb)), _) if now < nb => "not yet valid",
        _ => "enabled",
    }
}

pub fn list(ctx: &Ctx, path: &Path) -> Result<()> {
    let kf = KeyFile::load(path)?;
    let now = now();
    if ctx.out.json {
        let list: Vec<Value> = kf
            .doc
            .keys
            .iter()
            .map(|k| {
                let mut v = serde_json::to_value(k).expect("key serializes");
                v["enabled"] = json!(k.enabled);
                v["state"] = json!(state(k, now));
                v
            })
            .collect();
        ctx.out.json(&Value::Array(list));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = kf
        .doc
        .keys
        .iter()
        .map(|k| {
            vec![
                k.id.clone(),
                k.consumer.clone(),
                k.plan.clone(),
                state(k, now).to_string(),
                k.expires_at.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["ID", "CONSUMER", "PLAN", "STATE", "EXPIRES"], &rows)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(enabled: bool, nb: Option<&str>, exp: Option<&str>) -> KeyDoc {
        KeyDoc {
            id: "AbCdEf012345".into(),
            hash: "0".repeat(64),
            consumer: "c".into(),
            plan: "p".into(),
            enabled,
            not_before: nb.map(Into::into),
            expires_at: exp.map(Into::into),
            scopes: vec![],
            cidrs: vec![],
            metadata: BTreeMap::new(),
            lineage: None,
            limits: None,
        }
    }

    #[test]
    fn states() {
        let t = parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(state(&key(true, None, None), t), "enabled");
        assert_eq!(state(&key(false, None, Some("2000-01-01T00:00:00Z")), t), "disabled");
        assert_eq!(state(&key(true, None, Some("2030-01-01T00:00:00Z")), t), "expired");
        assert_eq!(state(&key(true, None, Some("2030-01-01T00:00:01Z")), t), "enabled");
        assert_eq!(
            state(&key(true, Some("2030-01-01T00:00:01Z"), None), t),
            "not yet valid"
        );
        assert_eq!(state(&key(true, Some("2030-01-01T00:00:00Z"), None), t), "enabled");
        assert_eq!(state(&key(true, None, Some("soon")), t), "invalid");
    }

    #[test]
    fn expiry_choice() {
        assert_eq!(expiry(None, None, 100), None);
        assert_eq!(expiry(Some(5), None, 100), Some(5));
        assert_eq!(expiry(None, Some(60), 100), Some(160));
    }
}
