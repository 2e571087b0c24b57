//! The import check: reads every `crate::<module>` path in `src/` (outside comments and
//! the binaries) and fails on an arrow back up or a circle between top-level modules.
//!
//! The layers, top down: the binaries; `client`; `api`; `audit`; `actors`; `config`
//! (the file's shape, converting into the types the modules below own); everything else,
//! which must form no circle. So no module below imports `config`, `actors` or `api`,
//! and a module can be read, tested and changed knowing only what is under it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module -> the modules it names, each with one place it does.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// Who may import each of the upper layers.
const UPPER: [(&str, &[&str]); 3] = [
    ("api", &["client"]),
    ("actors", &["api", "audit"]),
    ("config", &["api", "audit", "actors"]),
];

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = Graph::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            if path.ends_with("bin") {
                continue;
            }
            for entry in std::fs::read_dir(&path).expect("read src") {
                files.push(entry.expect("entry").path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_string())
            .expect("a name");
        if top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read file");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            let code = code.split(" //").next().unwrap_or(code);
            for (at, _) in code.match_indices("crate::") {
                let target: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if target.is_empty() || target == top {
                    continue;
                }
                graph
                    .entry(top.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    graph
}

/// A circle through `from`, as the path of modules, if there is one.
fn circle(graph: &Graph, from: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &Graph,
        at: &str,
        goal: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flat_map(|m| m.keys()) {
            if next == goal {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, goal, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![from.to_string()];
    walk(graph, from, from, &mut path, &mut BTreeSet::new()).then_some(path)
}

fn shown(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(from, to)| {
            let to: Vec<&str> = to.keys().map(String::as_str).collect();
            format!("  {from} -> {}", to.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_arrow_back_up_and_no_circle_between_top_level_modules() {
    let graph = graph();
    assert!(
        graph.len() > 10 && graph.contains_key("machine"),
        "the source was not read: {graph:?}"
    );
    let mut wrong = Vec::new();
    for (upper, allowed) in UPPER {
        for (from, to) in &graph {
            if let Some(place) = to.get(upper)
                && !allowed.contains(&from.as_str())
            {
                wrong.push(format!(
                    "{from} imports {upper} from below it ({place}); only {allowed:?} may"
                ));
            }
        }
    }
    for from in graph.keys() {
        if let Some(path) = circle(&graph, from) {
            let places: Vec<String> = path
                .windows(2)
                .map(|w| format!("{} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
                .collect();
            wrong.push(format!("a circle: {}", places.join(", ")));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n\nthe graph:\n{}",
        wrong.join("\n"),
        shown(&graph)
    );
}

#[test]
fn the_check_sees_a_circle_and_an_arrow_up() {
    let mut graph = Graph::new();
    graph
        .entry("a".into())
        .or_default()
        .insert("b".into(), "a.rs:1".into());
    assert!(circle(&graph, "a").is_none());
    graph
        .entry("b".into())
        .or_default()
        .insert("a".into(), "b.rs:1".into());
    assert_eq!(
        circle(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
