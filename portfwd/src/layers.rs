//! The module graph, checked: each layer imports only the layers before it
//! (see the crate doc and README's Layout), and neither crate has an import
//! cycle between its modules.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// The layers of this crate, lowest first; `error` may be used by all.
const LAYERS: [&[&str]; 10] = [
    &["error"],
    &["model"],
    &["instance"],
    &["host"],
    &["datapath"],
    &["state"],
    &["holder"],
    &["ops"],
    &["serve"],
    &["cli", "cni", "docker_proxy"],
];

/// The crate-level modules each module of `src` names through `crate::`
/// (at the top of a path or of a `use crate::{...}` group).
fn imports(src: &Path, prefix: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for entry in fs::read_dir(src).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let files: Vec<_> = if path.is_dir() {
            walk(&path)
        } else {
            vec![path.clone()]
        };
        let deps = graph.entry(name.clone()).or_default();
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            deps.extend(
                crate_paths(&text, prefix)
                    .into_iter()
                    .filter(|d| *d != name),
            );
        }
    }
    graph
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// First segments after `prefix` (`crate::`), including each top-level
/// item of a `crate::{a::x, b, c::{..}}` group.
fn crate_paths(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices(prefix) {
        let rest = &text[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 1 => item_start = true,
                    c if item_start && depth == 1 && !c.is_whitespace() => {
                        found.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|name| !name.is_empty() && name != "self");
    found
}

fn rank(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"))
}

/// Fails naming a cycle, if the graph has one.
fn assert_acyclic(graph: &BTreeMap<String, BTreeSet<String>>) {
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(at) = path.iter().position(|n| *n == node) {
            panic!("import cycle: {} -> {node}", path[at..].join(" -> "));
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(node);
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn layers_import_only_the_layers_below() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = imports(&src, "crate::");
    graph.retain(|module, _| !matches!(module.as_str(), "lib" | "main" | "layers"));
    for (module, deps) in &graph {
        for dep in deps {
            assert!(
                dep == "error" || rank(dep) < rank(module),
                "{module} imports {dep}, a layer that is not below it"
            );
        }
    }
    assert_acyclic(&graph);
}

#[test]
fn the_ebpf_crate_has_no_import_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../portfwd-ebpf/src");
    let mut graph = imports(&src, "crate::");
    graph.remove("main");
    assert!(
        graph.contains_key("maps") && graph.contains_key("tc"),
        "{graph:?}"
    );
    assert_acyclic(&graph);
}

#[test]
fn groups_and_paths_are_both_seen() {
    let text = "use crate::{\n    a::{x, y},\n    b, c::z,\n};\nlet v = crate::d::f();";
    let names: Vec<String> = crate_paths(text, "crate::").into_iter().collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
}
