//! `keyset init|validate|push` and `status`.

use crate::admin_client::{Admin, Response, BUSY_WAIT};
use crate::error::{failed, usage, Result};
use crate::keyfile::KeyFile;
use crate::output::{self, print_kv};
use crate::Ctx;
use serde_json::{json, Value};
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

pub fn push(ctx: &Ctx, path: &Path, force: bool, chunk_keys: usize) -> Result<()> {
    let admin = ctx.admin("keyset push")?;
    let bytes = std::fs::read(path).map_err(|e| failed(format!("{}: cannot read: {e}", path.display())))?;
    let kf = KeyFile::from_bytes(path, &bytes)?;
    let set = kf
        .doc
        .compile()
        .map_err(|e| failed(format!("{}: {e} (not pushed)", path.display())))?;
    let (api, resp) = if set.keys.len() > chunk_keys.max(1) {
        staged_push(&admin, &bytes, force, chunk_keys.max(1))?
    } else {
        let api = if force { "/v1/keyset?force=true" } else { "/v1/keyset" };
        let resp = admin
            .call_waiting("PUT", api, Some(&bytes), BUSY_WAIT)
            .map_err(failed)?;
        if !resp.ok() {
            return Err(failed(format!(
                "push to {} refused: {}",
                admin.url(api),
                resp.problem()
            )));
        }
        (api.to_string(), resp)
    };
    let api = api.as_str();
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

/// A large document as a staged upload: begin, the keys in chunks, commit; the upload
/// is aborted on any error. Returns the commit path and response.
fn staged_push(admin: &Admin, bytes: &[u8], force: bool, chunk_keys: usize) -> Result<(String, Response)> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| failed(format!("not JSON: {e}")))?;
    let keys = doc["keys"].as_array().map(Vec::as_slice).unwrap_or_default();
    let begin = "/v1/keyset/uploads";
    let resp = admin
        .call_waiting("POST", begin, Some(b""), BUSY_WAIT)
        .map_err(failed)?;
    if !resp.ok() {
        return Err(failed(format!(
            "push to {} refused: {}",
            admin.url(begin),
            resp.problem()
        )));
    }
    let id = resp
        .json()
        .and_then(|v| v["upload_id"].as_str().map(str::to_string))
        .ok_or_else(|| failed(format!("{}: no upload_id in the response", admin.url(begin))))?;
    let base = format!("{begin}/{id}");
    let abort = |e: crate::error::Fail| {
        // Best effort: the filter already aborted an upload it refused.
        let _ = admin.call("DELETE", &base, None);
        e
    };
    let keys_api = format!("{base}/keys");
    for chunk in keys.chunks(chunk_keys) {
        let body = serde_json::to_vec(chunk).expect("keys encode");
        let resp = admin
            .call("PUT", &keys_api, Some(&body))
            .map_err(|e| abort(failed(e)))?;
        if !resp.ok() {
            return Err(abort(failed(format!(
                "push to {} refused: {}",
                admin.url(&keys_api),
                resp.problem()
            ))));
        }
    }
    let commit = format!("{base}/commit{}", if force { "?force=true" } else { "" });
    let body = json!({"version": doc["version"], "plans": doc["plans"]}).to_string();
    let resp = admin
        .call("POST", &commit, Some(body.as_bytes()))
        .map_err(|e| abort(failed(e)))?;
    if !resp.ok() {
        return Err(abort(failed(format!(
            "push to {} refused: {}",
            admin.url(&commit),
            resp.problem()
        ))));
    }
    Ok((commit, resp))
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
