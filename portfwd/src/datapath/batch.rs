//! Reading and writing many entries of a map (a hash, or an array) in a
//! few system calls (BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH: kernel
//! 5.6), by raw bpf(2) calls: aya 0.14 has no API for the batch commands. Its iterator makes two
//! calls per entry (next key, then lookup), and its insert one: 20,000 calls
//! to read the services map of 10,000 mappings (most of what `apply` and
//! `list` spent), 10,000 to zero their counters. Also the one command aya
//! lacks for a single entry: BPF_MAP_LOOKUP_AND_DELETE_ELEM (`take`).

use std::os::fd::{AsRawFd, BorrowedFd};

/// Entries asked for per call (the kernel fills fewer at the end).
pub(crate) const CHUNK: usize = 4096;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Every entry of the hash or array map `map` (keys `K`, values `V`: not a
/// per-CPU map). An error of the call is returned as is: the caller falls back to
/// iterating (an older kernel says EINVAL).
pub(crate) fn lookup_all<K, V>(map: BorrowedFd<'_>) -> std::io::Result<Vec<(K, V)>>
where
    K: bytemuck::Pod,
    V: bytemuck::Pod,
{
    let mut entries = Vec::new();
    lookup_chunks(map, |keys: &[K], values: &[V]| {
        entries.extend(keys.iter().copied().zip(values.iter().copied()));
    })?;
    Ok(entries)
}

/// Every entry of the hash or array map `map`, handed to `each` a call's
/// worth at a time (up to CHUNK), so that a caller can pace its work
/// between calls. A hash map's walk goes by bucket: entries removed or
/// added meanwhile in buckets already read do not disturb it; an array's
/// goes by index. Errors as `lookup_all`'s.
pub(crate) fn lookup_chunks<K, V>(
    map: BorrowedFd<'_>,
    mut each: impl FnMut(&[K], &[V]),
) -> std::io::Result<()>
where
    K: bytemuck::Pod,
    V: bytemuck::Pod,
{
    let mut keys: Vec<K> = vec![K::zeroed(); CHUNK];
    let mut values: Vec<V> = vec![V::zeroed(); CHUNK];
    // The position where the previous call stopped, as the kernel hands it
    // back (a hash map's bucket number, an array's next index: a key's
    // size) and reads it again; never interpreted here. 8 bytes hold
    // either.
    let (mut position, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const position as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // The kernel writes at most `count` keys and values into buffers
        // that hold CHUNK of each, at most 8 bytes to `next`, and the
        // number it wrote to `attr.count`.
        let error = batch_call(BPF_MAP_LOOKUP_BATCH, &mut attr).err();
        let filled = (attr.count as usize).min(CHUNK);
        match error {
            None => each(&keys[..filled], &values[..filled]),
            // The end of the map (the last entries come with it).
            Some(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                each(&keys[..filled], &values[..filled]);
                return Ok(());
            }
            Some(error) => return Err(error),
        }
        position = next;
        first = false;
    }
}

/// Writes `values` (`value_len` bytes each: for a per-CPU map, one value per
/// possible CPU, each rounded up to 8 bytes) under `keys`, in order,
/// replacing what is there (the batch commands take no BPF_NOEXIST). On a
/// failure, the entries before the one that failed are written.
pub(crate) fn update_all<K: bytemuck::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[u8],
    value_len: usize,
) -> std::io::Result<()> {
    assert_eq!(values.len(), keys.len() * value_len, "one value per key");
    for (keys, values) in keys.chunks(CHUNK).zip(values.chunks(CHUNK * value_len)) {
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: 0,
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // The kernel reads `count` keys and values from buffers that hold
        // that many, and writes only `attr.count`.
        batch_call(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    }
    Ok(())
}

/// One batch command. `attr`'s buffers must be what its counts say: the
/// kernel reads and writes through them.
fn batch_call(command: libc::c_long, attr: &mut BatchAttr) -> std::io::Result<()> {
    // SAFETY: attr is the batch member of bpf_attr, of the size passed; the
    // callers keep the buffers it points to alive and as large as its
    // counts.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `union bpf_attr` for the commands on one element.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// Removes `key`'s entry from the hash map `map` and returns what it held,
/// in one step under the map's lock (kernel 5.14 for hash maps): unlike a
/// lookup then a delete, nothing written between the two can be lost.
/// None when there is no entry; an error of the call as is (an older
/// kernel says EINVAL or ENOTSUPP).
pub(crate) fn take<K, V>(map: BorrowedFd<'_>, key: &K) -> std::io::Result<Option<V>>
where
    K: bytemuck::Pod,
    V: bytemuck::Pod,
{
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: (&raw mut value) as u64,
        flags: 0,
    };
    // SAFETY: attr is the element member of bpf_attr, of the size passed;
    // the kernel reads a key and writes a value of the map's sizes, which
    // are K's and V's.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw mut attr,
            size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENOENT) {
        return Ok(None);
    }
    Err(error)
}
