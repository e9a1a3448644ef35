//! `keyset init|validate|push` and `status`.

use crate::error::{failed, usage, Result};
use crate::keyfile::KeyFile;
use crate::output::{self, print_kv};
use crate::Ctx;
use serde_json::json;
use std::path::Path;

pub fn init(ctx: &Ctx, path: &Path, mut plans: Vec<String>, force: bool) -> Result<()> {
    if plans.is_empty() {
        plans.push("default".into());
    }
    plans.sort();
    plans.dedup();
    if path.exists() && !force {
        return Err(failed(format!(
            "{}: already exists (use --force to overwrite)",
            path.display()
        )));
    }
    let kf = KeyFile::new(path, &plans);
    kf.doc.compile().map_err(|e| usage(e.to_string()))?;
    kf.save()?;
    if ctx.out.json {
        ctx.out
            .json(&json!({"file": path.display().to_string(), "version": 1, "plans": plans}));
    } else {
        println!("created {} (version 1, plans: {})", path.display(), plans.join(", "));
    }
    Ok(())
}

pub fn validate(ctx: &Ctx, path: &Path) -> Result<()> {
    let kf = KeyFile::load(path)?;
    let set = kf
        .doc
        .compile()
        .map_err(|e| failed(format!("{}: {e}", path.display())))?;
    if ctx.out.json {
        ctx.out
            .json(&json!({"ok": true, "keys": set.keys.len(), "plans": set.plans.len(), "version": set.version}));
    } else {
        println!(
            "ok: {} keys, {} plans, version {}",
            set.keys.len(),
            set.plans.len(),
            set.version
        );
    }
    Ok(())
}

pub fn push(ctx: &Ctx, path: &Path, force: bool) -> Result<()> {
    let admin = ctx.admin("keyset push")?;
    let bytes = std::fs::read(path).map_err(|e| failed(format!("{}: cannot read: {e}", path.display())))?;
    let kf = KeyFile::from_bytes(path, &bytes)?;
    let set = kf
        .doc
        .compile()
        .map_err(|e| failed(format!("{}: {e} (not pushed)", path.display())))?;
    let api = if force { "/v1/keyset?force=true" } else { "/v1/keyset" };
    let resp = admin.call("PUT", api, Some(&bytes)).map_err(failed)?;
    if !resp.ok() {
        return Err(failed(format!(
            "push to {} refused: {}",
            admin.url(api),
            resp.problem()
        )));
    }
    if ctx.out.json {
        match resp.json() {
            Some(v) => ctx.out.json(&v),
            None => ctx.out.json(&json!({"version": set.version, "keys": set.keys.len()})),
        }
    } else {
        println!(
            "pushed {} (version {}, {} keys) to {}",
            path.display(),
            set.version,
            set.keys.len(),
            admin.url(api)
        );
        if let Some(v) = resp.json() {
            print_kv(&v);
        }
    }
    Ok(())
}

pub fn status(ctx: &Ctx) -> Result<()> {
    let admin = ctx.admin("status")?;
    let resp = admin.call("GET", "/v1/status", None).map_err(failed)?;
    if !resp.ok() {
        return Err(failed(format!("{}: {}", admin.url("/v1/status"), resp.problem())));
    }
    if ctx.out.json {
        let text = String::from_utf8_lossy(&resp.body);
        println!("{}", text.trim_end());
    } else {
        match resp.json() {
            Some(v) => print_kv(&v),
            None => {
                output::warn("status response is not JSON");
                println!("{}", String::from_utf8_lossy(&resp.body).trim_end());
            }
        }
    }
    Ok(())
}
