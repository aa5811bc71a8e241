//! The layering of `src/`, enforced: every `crate::` path (in a `use` or inline) must
//! point to a module on the same layer or one below, as `src/lib.rs` describes them.
//! An upward import is the first step of an import circle, so it fails here, naming
//! the file and line, instead of waiting for a review.

use std::path::{Path, PathBuf};

/// The layers from the bottom up, and the top-level modules of `src/` on each. A
/// module may use its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    ("domain", &["domain", "error", "clock", "shutdown", "proto"]),
    ("store", &["store"]),
    (
        "use cases",
        &[
            "service",
            "request_rates",
            "watch",
            "webhooks",
            "cache",
            "health",
        ],
    ),
    ("transports", &["grpc", "rest", "console", "telemetry"]),
    ("app", &["app"]),
    ("command line", &["config", "cli"]),
];

/// The layer index of a top-level module, if the table names it.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// The top-level module a file of `src/` belongs to (`src/store/sql.rs` -> `store`).
fn module_of(relative: &Path) -> String {
    let first = relative.components().next().expect("a file under src/");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_owned()
}

/// `text` without `//` comments (doc comments included), so a path named in prose is
/// not read as an import. String literals that contain `//` are rare in `src/` and
/// would only hide a path, never invent one.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of each path a `crate::` reference starting at `at` names:
/// `crate::store::Store` names `store`; `crate::{grpc, rest::router}` names `grpc` and
/// `rest`.
fn modules_named_at(text: &str, at: usize) -> Vec<String> {
    let rest = &text[at + "crate::".len()..];
    if let Some(group) = rest.strip_prefix('{') {
        let mut depth = 1;
        let mut end = group.len();
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        // Split the group's items at its own commas, not those of nested groups.
        let mut items = vec![String::new()];
        let mut depth = 0;
        for c in group[..end].chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(String::new());
                    continue;
                }
                _ => {}
            }
            items.last_mut().expect("one item at least").push(c);
        }
        items
            .iter()
            .map(|item| leading_identifier(item.trim_start()))
            .filter(|name| !name.is_empty())
            .collect()
    } else {
        vec![leading_identifier(rest)]
    }
}

fn leading_identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every `crate::` reference in `text` (the file `relative` under `src/`) that points
/// up the layers, as "file:line: ..." lines.
fn upward_imports(relative: &Path, text: &str) -> Vec<String> {
    let module = module_of(relative);
    let Some(own_layer) = layer_of(&module) else {
        return vec![format!(
            "src/{}: module `{module}` is on no layer of the table: place it",
            relative.display()
        )];
    };
    let code = without_comments(text);
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        // `batchd::` or a longer identifier ending in `crate` is not this crate's root.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        for named in modules_named_at(&code, at) {
            match layer_of(&named) {
                Some(layer) if layer > own_layer => found.push(format!(
                    "src/{}:{line}: `{module}` ({}) uses `{named}` ({}), a layer above it",
                    relative.display(),
                    LAYERS[own_layer].0,
                    LAYERS[layer].0
                )),
                Some(_) => {}
                None => found.push(format!(
                    "src/{}:{line}: `crate::{named}` is on no layer of the table",
                    relative.display()
                )),
            }
        }
    }
    found
}

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

#[test]
fn no_module_of_src_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut upward = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src/");
        // The crate root declares every module, and main.rs is the binary on top.
        if relative == Path::new("lib.rs") || relative == Path::new("main.rs") {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("a source file");
        upward.extend(upward_imports(relative, &text));
        checked += 1;
    }
    assert!(checked > 50, "only {checked} files of src/ were read");
    assert!(
        upward.is_empty(),
        "imports pointing up the layers of src/lib.rs:\n{}",
        upward.join("\n")
    );
}

#[test]
fn a_planted_upward_import_is_caught_with_its_file_and_line() {
    let planted = "//! The store.\n\nuse crate::domain::Batch;\nuse crate::{error, app::ServeOptions};\n\nfn f() { let _ = crate::service::X; }\n// crate::rest is only named in a comment\n";
    let found = upward_imports(Path::new("store/planted.rs"), planted);
    assert_eq!(
        found,
        [
            "src/store/planted.rs:4: `store` (store) uses `app` (app), a layer above it",
            "src/store/planted.rs:6: `store` (store) uses `service` (use cases), a layer above it",
        ]
    );
    // The same lines are fine one layer up, and a downward group is fine anywhere.
    assert!(upward_imports(Path::new("config.rs"), planted).is_empty());
    let nested = "use crate::{\n    domain::{Batch, BatchId},\n    error::Result,\n};\n";
    assert!(upward_imports(Path::new("store/sql.rs"), nested).is_empty());
    assert!(
        upward_imports(Path::new("newroom/x.rs"), "")[0].contains("on no layer"),
        "a new top-level module must be placed on a layer"
    );
}
