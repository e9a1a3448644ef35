//! Credential parsing: any header values and path, with any sources enabled, never
//! panic; a found key is a valid key; a key taken from the query is gone from the path
//! parameter forwarded to the backend.
#![no_main]

use keymeter::core::auth::api_key::{ApiKey, KEY_LEN};
use keymeter::core::auth::credential::{find, query_value, strip_query_param, CredentialSources, Field, Source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // Fields separated by NUL; headers reach the core as (lossy) UTF-8 text.
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\0');
    let api_key = parts.next().filter(|_| flags & 1 != 0).map(str::to_string);
    let authorization = parts.next().filter(|_| flags & 2 != 0).map(str::to_string);
    let path = parts.next().map(str::to_string);
    let param = parts.next().filter(|p| !p.is_empty()).unwrap_or("api_key").to_string();
    let sources = CredentialSources {
        header: (flags & 4 != 0).then(|| "x-api-key".to_string()),
        bearer: flags & 8 != 0,
        basic: flags & 16 != 0,
        query_param: (flags & 32 != 0).then(|| param.clone()),
    };
    let found = find(&sources, |f| match f {
        Field::ApiKeyHeader => api_key.clone(),
        Field::Authorization => authorization.clone(),
        Field::Path => path.clone(),
    });
    if let Ok(cred) = found {
        let key = cred.key();
        assert_eq!(key.as_str().len(), KEY_LEN);
        assert!(ApiKey::parse(key.as_str()).is_ok());
        if cred.source == Source::Query {
            let path = path.as_deref().expect("query credential without a path");
            // The key may also sit elsewhere in the path if the client put it there; what
            // must be gone is the parameter the key was taken from.
            let stripped = strip_query_param(path, &param);
            assert_ne!(
                query_value(&stripped, &param),
                Some(key.as_str()),
                "key left in the forwarded query"
            );
        }
    }
    for s in [api_key.as_deref(), authorization.as_deref()].into_iter().flatten() {
        let _ = ApiKey::parse(s).map(|k| k.hash());
    }
    if let Some(p) = &path {
        let _ = query_value(p, &param);
        let stripped = strip_query_param(p, &param);
        assert!(stripped.len() <= p.len());
    }
});
