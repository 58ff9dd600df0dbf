//! Every preset against its documented sources: `spec/SPEC.md`, section "Presets and their
//! sources", holds one table per preset (`### \`paper\``, …) with a row per config field
//! (dotted name, value as TOML, source). This test parses those tables and fails when
//!
//! * a preset's resolved value differs from its row (a preset drifted from its source, or the
//!   table was not updated with a deliberate change);
//! * a field of the resolved config has no row (a new config field must be documented), or a
//!   row names no field;
//! * a source is empty or not one of the documented kinds, or a row that says it inherits
//!   (`as \`paper\``) does not have the other preset's value;
//! * a preset has no table, or a table names no preset.
//!
//! The comparison is on the resolved config (the preset's TOML over the defaults), so fields a
//! preset file does not spell out are checked too. `paper_preset_is_the_default` in
//! `tests/config.rs` is a separate check that the defaults are the paper's preset.

use std::collections::BTreeMap;

use eio_spec::Preset;
use serde_json::Value;

/// The section of SPEC.md that holds the tables.
const SECTION: &str = "## Presets and their sources";

/// How a source cell may begin: a place in the paper, a file of the authors', DVERGE's or TRS's
/// code, a project note, another preset's row, or a stated eio choice (SPEC.md lists these).
const SOURCE_KINDS: &[&str] = &[
    "paper ",
    "authors' ",
    "DVERGE ",
    "TRS ",
    "rivals.md",
    "protocols.md",
    "official-checkpoint.md",
    "as `",
    "eio choice: ",
];

/// One row of a preset table.
#[derive(Debug, Clone)]
struct Row {
    /// The value cell parsed as TOML and converted to JSON (`unset` is null).
    value: Value,
    /// The value cell as written.
    written: String,
    source: String,
    /// 1-based line in SPEC.md.
    line: usize,
}

/// The tables of the section, by preset name: field -> row. Panics on a malformed table.
fn tables(spec: &str) -> BTreeMap<String, BTreeMap<String, Row>> {
    let start = spec
        .find(SECTION)
        .unwrap_or_else(|| panic!("spec/SPEC.md has no section {SECTION:?}"));
    let first_line = spec[..start].matches('\n').count() + 1;
    let mut out: BTreeMap<String, BTreeMap<String, Row>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (k, line) in spec[start..].lines().enumerate().skip(1) {
        let number = first_line + k;
        if line.starts_with("## ") {
            break;
        }
        if let Some(title) = line.strip_prefix("### ") {
            let name = title.trim().trim_matches('`').to_string();
            assert!(
                !out.contains_key(&name),
                "SPEC.md:{number}: a second table for preset `{name}`"
            );
            out.insert(name.clone(), BTreeMap::new());
            current = Some(name);
            continue;
        }
        let Some(preset) = &current else { continue };
        let Some(inner) = line
            .trim()
            .strip_prefix('|')
            .and_then(|l| l.strip_suffix('|'))
        else {
            continue;
        };
        let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
        if cells.first() == Some(&"field") || cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
            continue; // header or separator
        }
        assert_eq!(
            cells.len(),
            3,
            "SPEC.md:{number}: a preset row has three cells (field | value | source): {line}"
        );
        let field = cells[0].trim_matches('`').to_string();
        let written = cells[1].to_string();
        let value = parse_value(&written)
            .unwrap_or_else(|e| panic!("SPEC.md:{number}: value of `{field}`: {e}"));
        let row = Row {
            value,
            written,
            source: cells[2].to_string(),
            line: number,
        };
        let table = out.get_mut(preset).expect("current table exists");
        assert!(
            table.insert(field.clone(), row).is_none(),
            "SPEC.md:{number}: a second row for `{field}` in the `{preset}` table"
        );
    }
    out
}

/// A value cell: `unset`, or one TOML value in backticks.
fn parse_value(cell: &str) -> Result<Value, String> {
    if cell == "unset" {
        return Ok(Value::Null);
    }
    let inner = cell
        .strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .ok_or_else(|| format!("{cell:?} is neither `unset` nor a TOML value in backticks"))?;
    let table: toml::Table =
        toml::from_str(&format!("v = {inner}")).map_err(|e| format!("{inner:?}: {e}"))?;
    serde_json::to_value(&table["v"]).map_err(|e| e.to_string())
}

/// The resolved config as dotted field -> JSON value (arrays are values; `None` is null).
fn fields(preset: Preset) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            _ => {
                out.insert(prefix.to_string(), value.clone());
            }
        }
    }
    let config = preset
        .config()
        .unwrap_or_else(|e| panic!("preset {}: {e}", preset.name()));
    let mut out = BTreeMap::new();
    walk(
        "",
        &serde_json::to_value(&config).expect("a config serialises"),
        &mut out,
    );
    out
}

/// How a value is written in a table (for the suggested rows of a failure message).
fn written(value: &Value) -> String {
    match value {
        Value::Null => "unset".into(),
        v => match toml::Value::try_from(v) {
            Ok(t) => format!("`{t}`"),
            Err(_) => format!("`{v}`"),
        },
    }
}

/// Every difference between the presets and SPEC.md's tables, as messages.
fn problems(spec: &str) -> Vec<String> {
    let tables = tables(spec);
    let mut problems = Vec::new();
    for name in tables.keys() {
        if Preset::from_name(name).is_none() {
            problems.push(format!(
                "SPEC.md has a table for `{name}`, which is not a preset"
            ));
        }
    }
    for preset in Preset::ALL {
        let name = preset.name();
        let file = format!("configs/{name}.toml");
        let Some(table) = tables.get(name) else {
            problems.push(format!(
                "SPEC.md, section {SECTION:?}, has no table \"### `{name}`\" for {file}"
            ));
            continue;
        };
        let actual = fields(preset);
        for (field, value) in &actual {
            match table.get(field) {
                None => problems.push(format!(
                    "{file}: field `{field}` (= {}) has no row in SPEC.md's `{name}` table; add \
                     `| `{field}` | {} | <source> |`",
                    written(value),
                    written(value)
                )),
                Some(row) if &row.value != value => problems.push(format!(
                    "{file}: `{field}` is {} but SPEC.md:{} (`{name}` table) says {} (source: {})",
                    written(value),
                    row.line,
                    row.written,
                    row.source
                )),
                Some(_) => {}
            }
        }
        for (field, row) in table {
            if !actual.contains_key(field) {
                problems.push(format!(
                    "SPEC.md:{}: `{name}` table has a row for `{field}`, which is not a config field",
                    row.line
                ));
            }
            let source = row.source.as_str();
            if source.is_empty() || !SOURCE_KINDS.iter().any(|k| source.starts_with(k)) {
                problems.push(format!(
                    "SPEC.md:{}: source of `{field}` in the `{name}` table must start with one of \
                     {SOURCE_KINDS:?}, found {source:?}",
                    row.line
                ));
            }
            if source == "eio choice: " || source.trim_end() == "eio choice:" {
                problems.push(format!(
                    "SPEC.md:{}: `{field}` (`{name}`): an eio choice must say why",
                    row.line
                ));
            }
            if let Some(rest) = source.strip_prefix("as `") {
                let other = rest.split('`').next().unwrap_or_default();
                match tables.get(other).and_then(|t| t.get(field)) {
                    Some(o) if o.value == row.value => {}
                    Some(o) => problems.push(format!(
                        "SPEC.md:{}: `{field}` (`{name}`) says \"as `{other}`\" but is {} where \
                         `{other}` has {} (SPEC.md:{})",
                        row.line, row.written, o.written, o.line
                    )),
                    None => problems.push(format!(
                        "SPEC.md:{}: `{field}` (`{name}`) says \"as `{other}`\" but `{other}` has \
                         no such row",
                        row.line
                    )),
                }
            }
        }
    }
    problems
}

fn spec_text() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("SPEC.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_preset_matches_its_source_table() {
    let problems = problems(&spec_text());
    assert!(
        problems.is_empty(),
        "{} preset field(s) disagree with spec/SPEC.md, section {SECTION:?}:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The checker itself: a table edited away from its preset, a missing row, an unknown row, a
/// bad source and a wrong "as" are each reported (so the test above can fail).
#[test]
fn the_checker_reports_each_kind_of_drift() {
    let spec = spec_text();
    let find_row = |field: &str| -> String {
        let start = spec.find("### `paper`").expect("a paper table");
        spec[start..]
            .lines()
            .find(|l| l.starts_with(&format!("| `{field}` |")))
            .unwrap_or_else(|| panic!("paper table has a `{field}` row"))
            .to_string()
    };
    let replace_first_after = |marker: &str, old: &str, new: &str| -> String {
        let start = spec.find(marker).expect("marker");
        let at = start + spec[start..].find(old).expect("row after marker");
        format!("{}{}{}", &spec[..at], new, &spec[at + old.len()..])
    };

    // A value that drifted.
    let eps = find_row("distill.eps");
    let drifted = replace_first_after("### `paper`", &eps, &eps.replace("`0.07`", "`0.05`"));
    let p = problems(&drifted);
    assert!(
        p.iter().any(
            |m| m.contains("configs/paper.toml: `distill.eps` is `0.07`")
                && m.contains("says `0.05`")
        ),
        "{p:?}"
    );

    // A row removed: the field is undocumented.
    let gone = replace_first_after("### `paper`", &format!("{eps}\n"), "");
    let p = problems(&gone);
    assert!(
        p.iter()
            .any(|m| m.contains("`distill.eps` (= `0.07`) has no row")),
        "{p:?}"
    );

    // A row for no field.
    let extra = replace_first_after(
        "### `paper`",
        &format!("{eps}\n"),
        &format!("{eps}\n| `distill.epsilon` | `0.07` | paper Sec. 4.1 |\n"),
    );
    assert!(problems(&extra)
        .iter()
        .any(|m| m.contains("row for `distill.epsilon`, which is not a config field")));

    // A source of no known kind, and an eio choice without a reason.
    let vague = replace_first_after(
        "### `paper`",
        &eps,
        "| `distill.eps` | `0.07` | somewhere |",
    );
    assert!(problems(&vague)
        .iter()
        .any(|m| m.contains("source of `distill.eps`")));
    let bare = replace_first_after(
        "### `paper`",
        &eps,
        "| `distill.eps` | `0.07` | eio choice: |",
    );
    assert!(problems(&bare)
        .iter()
        .any(|m| m.contains("an eio choice must say why")));

    // "as `paper`" must carry paper's value.
    let quick_eps = {
        let start = spec.find("### `quick`").expect("a quick table");
        spec[start..]
            .lines()
            .find(|l| l.starts_with("| `train.lr` |"))
            .expect("quick has train.lr")
            .to_string()
    };
    let wrong_as = replace_first_after(
        "### `quick`",
        &quick_eps,
        "| `train.lr` | `0.2` | as `paper` |",
    );
    let p = problems(&wrong_as);
    assert!(
        p.iter()
            .any(|m| m.contains("says \"as `paper`\" but is `0.2`")),
        "{p:?}"
    );
}

#[test]
fn value_cells_parse_as_toml() {
    assert_eq!(parse_value("unset").unwrap(), Value::Null);
    assert_eq!(parse_value("`0.1`").unwrap(), serde_json::json!(0.1));
    assert_eq!(
        parse_value("`[100, 150]`").unwrap(),
        serde_json::json!([100, 150])
    );
    assert_eq!(
        parse_value("`\"step\"`").unwrap(),
        serde_json::json!("step")
    );
    // An integer is not a float: `1` does not match a width of 1.0.
    assert_ne!(parse_value("`1`").unwrap(), serde_json::json!(1.0));
    assert!(parse_value("0.1").is_err());
    assert!(parse_value("`[1, `").is_err());
}
