//! `km/idx/<slot>/<n>`: the ids written to a slot, in chunks of `INDEX_CHUNK` ids,
//! because shared data cannot be listed and the sweep must find the old records.

use crate::core::keyset::apply::ApplyError;
use crate::core::keyset::names::{index_chunk_name, index_len_name};
use crate::core::store::{read_value, Store};

/// Ids per index chunk (12 bytes each).
pub const INDEX_CHUNK: usize = 4096;

pub(crate) fn read_index(store: &dyn Store, slot: u8) -> Vec<String> {
    let n = read_value(store, &index_len_name(slot))
        .0
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes) as usize;
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

/// Replaces a slot's index with `ids`, emptying chunks the old index had beyond it.
pub(crate) fn write_index<'a>(
    store: &dyn Store,
    slot: u8,
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), ApplyError> {
    let old_n = read_value(store, &index_len_name(slot))
        .0
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes) as usize;
    let n = ids.len();
    let mut chunk = Vec::with_capacity(INDEX_CHUNK * 12);
    let mut i = 0;
    for id in ids {
        chunk.extend_from_slice(id.as_bytes());
        if chunk.len() == INDEX_CHUNK * 12 {
            store.set(&index_chunk_name(slot, i), &chunk, None)?;
            chunk.clear();
            i += 1;
        }
    }
    if !chunk.is_empty() {
        store.set(&index_chunk_name(slot, i), &chunk, None)?;
        i += 1;
    }
    for j in i..old_n.div_ceil(INDEX_CHUNK) {
        store.set(&index_chunk_name(slot, j), &[], None)?;
    }
    store.set(&index_len_name(slot), &(n as u64).to_le_bytes(), None)?;
    Ok(())
}

pub(crate) fn append_index(store: &dyn Store, slot: u8, new_ids: &[String]) -> Result<(), ApplyError> {
    if new_ids.is_empty() {
        return Ok(());
    }
    let mut ids = read_index(store, slot);
    ids.extend(new_ids.iter().cloned());
    write_index(store, slot, ids.iter().map(String::as_str))
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
