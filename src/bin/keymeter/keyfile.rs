//! The key-set file: the source of truth for keys and plans (a JSON `KeySetDoc`).
//!
//! The CLI rewrites `version` and `keys` but never `plans`: the plans section is kept
//! exactly as the JSON value that was read (so hand-written plans are not expanded with
//! every defaulted field), and only checked through the typed document.
//! Writes are atomic (temp file in the same directory, fsync, rename), pretty-printed.

use crate::error::{failed, Result};
use keymeter::core::keyset::document::{parse_json, KeyDoc, KeySetDoc};
use keymeter::core::limits::plan::PlanDoc;
use serde::Serialize;
use serde_json::{Map, Value};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "keyset.json";

#[derive(Debug)]
pub struct KeyFile {
    pub path: PathBuf,
    pub doc: KeySetDoc,
    /// The `plans` object as read (or created by `init`); written back unchanged.
    plans_raw: Value,
}

/// Field order of the written file.
#[derive(Serialize)]
struct OnDisk<'a> {
    version: u64,
    plans: &'a Value,
    keys: &'a [KeyDoc],
}

impl KeyFile {
    /// A new document (version 1) with the named plans, each empty (`{}`).
    pub fn new(path: &Path, plans: &[String]) -> KeyFile {
        let doc = KeySetDoc {
            version: 1,
            plans: plans.iter().map(|p| (p.clone(), PlanDoc::default())).collect(),
            keys: Vec::new(),
        };
        let plans_raw = Value::Object(plans.iter().map(|p| (p.clone(), Value::Object(Map::new()))).collect());
        KeyFile {
            path: path.to_path_buf(),
            doc,
            plans_raw,
        }
    }

    /// Reads and parses (not yet validates) the file.
    pub fn load(path: &Path) -> Result<KeyFile> {
        let bytes = fs::read(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => failed(format!(
                "{}: no such file (create one with `keymeter keyset init`)",
                path.display()
            )),
            _ => failed(format!("{}: cannot read: {e}", path.display())),
        })?;
        Self::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<KeyFile> {
        let doc: KeySetDoc = parse_json(bytes).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        // The typed parse succeeded, so this is valid JSON with an object at the top.
        let raw: Value = serde_json::from_slice(bytes).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        let plans_raw = raw.get("plans").cloned().unwrap_or_else(|| Value::Object(Map::new()));
        Ok(KeyFile {
            path: path.to_path_buf(),
            doc,
            plans_raw,
        })
    }

    /// Pretty JSON, as written to disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let on_disk = OnDisk {
            version: self.doc.version,
            plans: &self.plans_raw,
            keys: &self.doc.keys,
        };
        let mut s = serde_json::to_string_pretty(&on_disk).expect("key set serializes");
        s.push('\n');
        s.into_bytes()
    }

    /// Index of the key with this id.
    pub fn find(&self, id: &str) -> Result<usize> {
        self.doc
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or_else(|| failed(format!("{}: no key with id {id}", self.path.display())))
    }

    /// Increments the version (every mutation does).
    pub fn bump(&mut self) -> Result<u64> {
        self.doc.version = self
            .doc
            .version
            .checked_add(1)
            .ok_or_else(|| failed("version overflow"))?;
        Ok(self.doc.version)
    }

    /// Writes atomically: temp file next to the target, fsync, rename.
    pub fn save(&self) -> Result<()> {
        write_atomic(&self.path, &self.to_bytes())
            .map_err(|e| failed(format!("{}: cannot write: {e}", self.path.display())))
    }
}

/// Writes `data` to `path` atomically (temp file next to it, fsync, rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        if let Ok(meta) = fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all(); // make the rename durable; best effort
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keymeter-keyfile-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn new_file_has_empty_plans_and_round_trips() {
        let d = tmpdir("new");
        let p = d.join("ks.json");
        let kf = KeyFile::new(&p, &["default".into(), "pro".into()]);
        kf.save().unwrap();
        let text = fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("{\n  \"version\": 1,\n  \"plans\": {\n    \"default\": {},\n"),
            "{text}"
        );
        let back = KeyFile::load(&p).unwrap();
        assert_eq!(back.doc, kf.doc);
        assert_eq!(back.to_bytes(), text.as_bytes());
        back.doc.compile().unwrap();
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn keeps_plans_as_written_and_rewrites_keys() {
        let d = tmpdir("plans");
        let p = d.join("ks.json");
        let src = r#"{"version": 4, "plans": {"free": {"rate_limits": [{"name": "rps", "rate": 5, "per": "1s"}]}},
            "keys": [{"id": "AbCdEf012345", "hash": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                      "consumer": "acme", "plan": "free", "enabled": false}]}"#;
        fs::write(&p, src).unwrap();
        let mut kf = KeyFile::load(&p).unwrap();
        assert_eq!(kf.find("AbCdEf012345").unwrap(), 0);
        assert!(kf
            .find("Zz0000000000")
            .unwrap_err()
            .to_string()
            .contains("no key with id Zz0000000000"));
        kf.doc.keys[0].enabled = true;
        assert_eq!(kf.bump().unwrap(), 5);
        kf.save().unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        assert_eq!(v["version"], 5);
        // no defaulted fields were added to the plan
        assert_eq!(
            v["plans"]["free"],
            serde_json::json!({"rate_limits": [{"name": "rps", "rate": 5, "per": "1s"}]})
        );
        assert!(v["keys"][0].get("enabled").is_none());
        let again = KeyFile::load(&p).unwrap();
        assert_eq!(again.doc, kf.doc);
        // no temp files left behind
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn load_errors_name_the_file() {
        let d = tmpdir("errors");
        let p = d.join("missing.json");
        assert!(KeyFile::load(&p).unwrap_err().to_string().contains("no such file"));
        fs::write(&p, "{\"version\": 1, \"kyes\": []}").unwrap();
        let e = KeyFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("missing.json") && e.contains("unknown field"), "{e}");
        fs::remove_dir_all(d).unwrap();
    }
}
