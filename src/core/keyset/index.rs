//! `km/idx/<slot>/<n>`: the ids written to a slot, in chunks of `INDEX_CHUNK` ids,
//! because shared data cannot be listed and the sweep must find the old records.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::names::{index_chunk_name, index_len_name};
use crate::core::store::{read_value, Store};

/// Ids per index chunk (12 bytes each).
pub const INDEX_CHUNK: usize = 4096;

#[cfg(test)]
pub(crate) fn read_index(store: &dyn Store, slot: u8) -> Vec<String> {
    let n = crate::core::store::read_u64(store, &index_len_name(slot)) as usize;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n.div_ceil(INDEX_CHUNK) {
        if let Some(chunk) = read_value(store, &index_chunk_name(slot, i)).0 {
            ids.extend(
                chunk
                    .chunks(12)
                    .filter_map(|c| std::str::from_utf8(c).ok())
                    .map(str::to_string),
            );
        }
    }
    ids.truncate(n);
    ids
}

/// Writes `ids` at positions `at..` of a slot's index and sets its length to the end
/// of them. Only the chunks those positions fall in are written (the last chunk is
/// read and extended), so a delta creating one key costs O(1), not a rewrite of the
/// index (~12 MB at a million keys). Positional, hence idempotent: a resumed delta
/// writes the same ids at the same positions.
pub(crate) fn write_index_at(store: &dyn Store, slot: u8, at: usize, ids: &[String]) -> Result<(), ApplyError> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut ci = at / INDEX_CHUNK;
    let mut chunk = read_value(store, &index_chunk_name(slot, ci)).0.unwrap_or_default();
    chunk.truncate((at % INDEX_CHUNK) * 12);
    for id in ids {
        chunk.extend_from_slice(id.as_bytes());
        if chunk.len() == INDEX_CHUNK * 12 {
            store.set(&index_chunk_name(slot, ci), &chunk, None)?;
            chunk.clear();
            ci += 1;
        }
    }
    if !chunk.is_empty() {
        store.set(&index_chunk_name(slot, ci), &chunk, None)?;
    }
    store.set(&index_len_name(slot), &((at + ids.len()) as u64).to_le_bytes(), None)?;
    Ok(())
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::keyset::full_push::apply_full;
    use crate::core::keyset::test_support::*;
    use crate::core::store::MemStore;
    use crate::core::store::Store;

    #[test]
    fn index_spans_chunks() {
        let s = MemStore::default();
        let many = ids(INDEX_CHUNK * 2 + 5);
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        apply_full(&s, &set(1, &refs), opts()).unwrap();
        assert_eq!(read_index(&s, 0).len(), many.len());
        let r = apply_full(&s, &set(2, &refs[..10]), opts()).unwrap();
        assert_eq!(r.removed as usize, many.len() - 10);
        assert_eq!(read_index(&s, 0).len(), 0);
        assert_eq!(s.get(&index_chunk_name(0, 2)).0.unwrap().len(), 0);
    }
}
