//! The eBPF object: loading it against the pinned maps, sized as asked,
//! and refusing maps pinned by a build whose layout differs. Every name and
//! size comes from `portfwd_common`'s ABI table.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader, maps::MapData};
use portfwd_common::{CONNTRACK, CONNTRACK_OPENING, COUNTERS, MAPS, SERVICES, opening_flows};

/// The eBPF object, built by `cargo xtask build-ebpf` and embedded by build.rs.
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portfwd.bpf.o"));

/// Capacities for maps created by this load (existing maps keep theirs).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sizes {
    pub(crate) max_mappings: Option<u32>,
    pub(crate) max_flows: Option<u32>,
}

impl Sizes {
    /// The capacity each map gets, where it differs from the table's.
    fn overrides(self) -> Vec<(&'static str, u32)> {
        let mut out = Vec::new();
        if let Some(n) = self.max_mappings {
            out.extend([(SERVICES.name, n), (COUNTERS.name, n)]);
        }
        if let Some(n) = self.max_flows {
            // Two conntrack entries per flow. (The socket path's slots are a
            // fixed array, backed by each socket's own storage: nothing to
            // size.)
            out.push((CONNTRACK.name, n.saturating_mul(2)));
            out.push((CONNTRACK_OPENING.name, opening_flows(n).saturating_mul(2)));
        }
        out
    }
}

/// Loads the object, reusing the maps pinned under `pin_dir`; maps created
/// now get the given capacities.
pub(crate) fn load(pin_dir: &Path, sizes: Sizes) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for (name, max_entries) in sizes.overrides() {
        loader.map_max_entries(name, max_entries);
    }
    // An opening table created beside a pinned main table (an upgrade from
    // a build without it) is sized from that table, which keeps its size.
    if let Some(entries) = opening_entries_beside(pin_dir) {
        loader.map_max_entries(CONNTRACK_OPENING.name, entries);
    }
    let paths: Vec<(&str, PathBuf)> = MAPS
        .iter()
        .map(|map| (map.name, pin_dir.join(map.name)))
        .collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.load(OBJECT).context(
        "loading portfwd's eBPF object (a map pinned by another portfwd version with a different layout? `portfwd down` removes it)",
    )
}

/// The size of an opening table to create beside the main conntrack table
/// pinned under `pin_dir` (a quarter of its flows, see `opening_flows`);
/// None when the main table is not pinned (both are created as asked) or
/// the opening one is (it keeps its size).
fn opening_entries_beside(pin_dir: &Path) -> Option<u32> {
    if pin_dir.join(CONNTRACK_OPENING.name).exists() {
        return None;
    }
    let main = MapData::from_pin(pin_dir.join(CONNTRACK.name)).ok()?;
    let flows = main.info().ok()?.max_entries() / 2;
    Some(opening_flows(flows).saturating_mul(2))
}

/// Refuses to mix this build with maps pinned by a build whose layout
/// differs: their entries would be misread.
pub(crate) fn check_pinned_layouts(pin_dir: &Path) -> Result<()> {
    for map in MAPS {
        let path = pin_dir.join(map.name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)?.info()?;
        let (key, value) = (map.key_size, map.value_size);
        if (info.key_size(), info.value_size()) != (key, value) {
            bail!(
                "the pinned map {} has another layout (key {}/value {} bytes; this portfwd uses {key}/{value}): \
                 run `portfwd down --keep-state` with the portfwd that created it, then `portfwd up` with this one \
                 (mappings come back from the state file; tracked flows restart)",
                map.name,
                info.key_size(),
                info.value_size()
            );
        }
    }
    Ok(())
}

/// Notes when asked-for capacities differ from those of existing maps.
pub(crate) fn size_notes(pin_dir: &Path, sizes: Sizes) -> Vec<String> {
    // (map, flag, value asked, map entries per unit of the flag)
    let asked = [
        (SERVICES.name, "--max-mappings", sizes.max_mappings, 1),
        (CONNTRACK.name, "--max-flows", sizes.max_flows, 2),
    ];
    let mut notes = Vec::new();
    for (name, flag, wanted, per_unit) in asked {
        let Some(wanted) = wanted else { continue };
        let Ok(info) = MapData::from_pin(pin_dir.join(name)).and_then(|m| m.info()) else {
            continue;
        };
        if info.max_entries() != wanted.saturating_mul(per_unit) {
            notes.push(format!(
                "{flag} {wanted} not applied: the existing maps hold {} (sizes apply when the maps are created: `portfwd down --keep-state`, then `up`)",
                info.max_entries() / per_unit
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use aya_obj::{
        Object, ProgramSection,
        generated::{bpf_insn, bpf_map_type as map_type},
    };
    use portfwd_common::{Hook, MapKind, PRIVATE_MAPS, programs};

    use super::*;

    fn kind_of(map_type: u32) -> Option<MapKind> {
        let kind = match map_type {
            t if t == map_type::BPF_MAP_TYPE_HASH as u32 => MapKind::Hash,
            t if t == map_type::BPF_MAP_TYPE_LRU_HASH as u32 => MapKind::LruHash,
            t if t == map_type::BPF_MAP_TYPE_ARRAY as u32 => MapKind::Array,
            t if t == map_type::BPF_MAP_TYPE_PERCPU_ARRAY as u32 => MapKind::PerCpuArray,
            t if t == map_type::BPF_MAP_TYPE_PERCPU_HASH as u32 => MapKind::PerCpuHash,
            t if t == map_type::BPF_MAP_TYPE_RINGBUF as u32 => MapKind::RingBuf,
            t if t == map_type::BPF_MAP_TYPE_SK_STORAGE as u32 => MapKind::SkStorage,
            t if t == map_type::BPF_MAP_TYPE_LPM_TRIE as u32 => MapKind::LpmTrie,
            _ => return None,
        };
        Some(kind)
    }

    /// The object file that the eBPF crate built has exactly the maps and
    /// programs of the ABI table, with the table's layouts and hooks.
    #[test]
    fn the_object_matches_the_abi_table() {
        let object = Object::parse(OBJECT).expect("parsing the embedded eBPF object");
        let maps: BTreeMap<&str, _> = object
            .maps
            .iter()
            .filter(|(name, _)| !name.starts_with('.'))
            .map(|(name, map)| (name.as_str(), map))
            .collect();
        for def in MAPS {
            let map = maps
                .get(def.name)
                .unwrap_or_else(|| panic!("no map {}", def.name));
            assert_eq!(kind_of(map.map_type()), Some(def.kind), "{}", def.name);
            assert_eq!(map.key_size(), def.key_size, "{} key", def.name);
            assert_eq!(map.value_size(), def.value_size, "{} value", def.name);
            assert_eq!(map.max_entries(), def.max_entries, "{} size", def.name);
            assert_eq!(map.map_flags(), def.flags, "{} flags", def.name);
        }
        let known: Vec<&str> = MAPS.iter().map(|m| m.name).chain(PRIVATE_MAPS).collect();
        for name in maps.keys() {
            assert!(known.contains(name), "map {name} is not in the ABI table");
        }

        let sections: BTreeMap<&str, &ProgramSection> = object
            .programs
            .iter()
            .map(|(name, program)| (name.as_str(), &program.section))
            .collect();
        for def in programs() {
            let section = sections
                .get(def.name)
                .unwrap_or_else(|| panic!("no program {}", def.name));
            let matches = match (def.hook, section) {
                (
                    Hook::CgroupSockAddr(hook),
                    ProgramSection::CgroupSockAddr { attach_type, .. },
                ) => {
                    // aya names them Connect4, UDPSendMsg4, GetPeerName4...
                    format!("{attach_type:?}").to_lowercase().ends_with(hook)
                }
                (Hook::CgroupSock(hook), ProgramSection::CgroupSock { attach_type }) => {
                    // SockRelease for "sock_release".
                    format!("{attach_type:?}").to_lowercase() == hook.replace('_', "")
                }
                (Hook::TcIngress | Hook::TcEgress, ProgramSection::SchedClassifier) => true,
                (Hook::Iter(_), ProgramSection::Iter { sleepable: false }) => true,
                _ => false,
            };
            assert!(
                matches,
                "{} is {section:?}, the table says {:?}",
                def.name, def.hook
            );
        }
        assert_eq!(sections.len(), programs().count(), "{:?}", sections.keys());
    }

    /// The stack of a program's deepest chain of calls, as 6.1's verifier
    /// counts it, fits its 512 bytes: each frame's deepest stack access,
    /// rounded up to 32 bytes (`check_max_stack_depth`). Verifiers from
    /// about 6.7 round a JIT-compiled program's frames up to 16 bytes only
    /// (`round_up_stack_depth`), so this kernel loads programs that 6.1
    /// rejects ("combined stack size of 5 calls is 544"); this test finds
    /// that in a second, the 6.1 guest of `cargo xtask test` in minutes.
    #[test]
    fn every_programs_deepest_call_chain_fits_older_verifiers_stack() {
        let mut object = Object::parse(OBJECT).expect("parsing the embedded eBPF object");
        let text_sections: HashSet<usize> = object.functions.keys().map(|key| key.0).collect();
        object
            .relocate_calls(&text_sections)
            .expect("linking the object's calls");
        let mut failures = Vec::new();
        for (name, program) in &object.programs {
            let instructions = &object.functions[&program.function_key()].instructions;
            let (depth, chain) = deepest_chain(name, instructions);
            if depth > 512 || chain.len() > 8 {
                failures.push(format!("{name}: {depth} bytes, frames {chain:?}"));
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    /// The stack of the deepest chain of calls from the program's start, and
    /// that chain's frames (each one's deepest access): a linked program's
    /// functions follow its own, each starting where a call goes.
    fn deepest_chain(program: &str, instructions: &[bpf_insn]) -> (u32, Vec<u32>) {
        const CALL: u8 = 0x85;
        const LOAD_IMM64: u8 = 0x18;
        const MOV64_REG: u8 = 0xbf;
        const ADD64_IMM: u8 = 0x07;
        const PSEUDO_CALL: u8 = 1;
        const PSEUDO_FUNC: u8 = 4;
        const TAIL_CALL: i32 = 12;
        const FRAME_POINTER: u8 = 10;
        for insn in instructions {
            // What the count below does not model: a callback (bpf_loop, a
            // timer) is a frame of its own, and a tail call has rules of
            // its own for the stack. None is used; if one comes, this test
            // must learn it rather than count short.
            assert!(
                !(insn.code == LOAD_IMM64 && insn.src_reg() == PSEUDO_FUNC),
                "{program}: a callback; the stack count does not follow them"
            );
            assert!(
                !(insn.code == CALL && insn.src_reg() == 0 && insn.imm == TAIL_CALL),
                "{program}: a tail call; the stack count does not model them"
            );
        }
        let target = |at: usize, insn: &bpf_insn| {
            (insn.code == CALL && insn.src_reg() == PSEUDO_CALL)
                .then(|| usize::try_from(at as i64 + 1 + i64::from(insn.imm)).unwrap())
        };
        let mut starts: BTreeSet<usize> = [0].into();
        starts.extend(
            instructions
                .iter()
                .enumerate()
                .filter_map(|(at, insn)| target(at, insn)),
        );
        let bounds: Vec<usize> = starts.iter().copied().chain([instructions.len()]).collect();
        let frame = |start: usize| -> (u32, Vec<usize>) {
            let end = bounds[bounds.iter().position(|&b| b == start).unwrap() + 1];
            // The stack is reached through r10 and through registers that
            // hold r10 plus a constant (`rX = r10; rX += -N`): accesses
            // through them, and their handing to a helper or a function
            // (which may write the whole buffer), count at their offset.
            // Followed in instruction order, which over-counts at worst.
            let mut stack_offset: [Option<i64>; 11] = [None; 11];
            stack_offset[usize::from(FRAME_POINTER)] = Some(0);
            let mut depth = 0;
            let mut reach = |offset: i64| {
                if offset < 0 {
                    depth = depth.max(u32::try_from(-offset).unwrap());
                }
            };
            let mut callees = Vec::new();
            for (at, insn) in instructions.iter().enumerate().take(end).skip(start) {
                let (dst, src) = (usize::from(insn.dst_reg()), usize::from(insn.src_reg()));
                let class = insn.code & 7;
                // LDX reads from src + off; ST and STX write to dst + off.
                let base = match class {
                    1 => Some(src),
                    2 | 3 => Some(dst),
                    _ => None,
                };
                if let Some(Some(offset)) = base.and_then(|r| stack_offset.get(r)) {
                    reach(offset + i64::from(insn.off));
                }
                if insn.code == CALL {
                    // The arguments, r1 to r5.
                    for offset in stack_offset[1..=5].iter().flatten() {
                        reach(*offset);
                    }
                    callees.extend(target(at, insn));
                    stack_offset[..6].fill(None);
                    continue;
                }
                // What a write to a register leaves in it.
                let writes_dst = matches!(class, 0 | 1 | 4 | 7);
                if writes_dst && dst < usize::from(FRAME_POINTER) {
                    stack_offset[dst] = match insn.code {
                        MOV64_REG => stack_offset[src],
                        ADD64_IMM => stack_offset[dst].map(|o| o + i64::from(insn.imm)),
                        _ => None,
                    };
                }
            }
            (depth, callees)
        };
        fn walk(
            start: usize,
            frame: &dyn Fn(usize) -> (u32, Vec<usize>),
            seen: &mut Vec<usize>,
        ) -> (u32, Vec<u32>) {
            let (depth, callees) = frame(start);
            seen.push(start);
            let mut deepest = (0, Vec::new());
            for callee in callees {
                if seen.contains(&callee) {
                    continue; // recursion: the verifier refuses it anyway
                }
                let chain = walk(callee, frame, seen);
                if chain.0 > deepest.0 {
                    deepest = chain;
                }
            }
            seen.pop();
            // As 6.1 rounds: a frame of at least 1 byte, to 32.
            let (below, mut chain) = deepest;
            chain.insert(0, depth);
            (depth.max(1).next_multiple_of(32) + below, chain)
        }
        walk(0, &frame, &mut Vec::new())
    }
}
