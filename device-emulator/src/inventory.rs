//! The device inventory of `device enroll --inventory FILE` (pure parsing and checking): a CSV
//! file with one row per device, its id, the path of the CSR the device made (its key never
//! leaves it) and its own labels. Everything is checked before anything is issued, and every
//! error names the file, the line and the column, so a bad row is fixed where it is and nothing is
//! half enrolled.
//!
//! ```text
//! # inventory.csv: lines starting with # are comments
//! id,csr,labels
//! gw-berlin-01,csr/gw-berlin-01.csr,site=berlin;tier=gold
//! gw-paris-07,/secure/paris-07.csr,site=paris
//! ```
//!
//! CSV rather than YAML: a hardware inventory usually comes out of a spreadsheet or an asset
//! database as CSV, one device per line, and the CSV reader gives every row its line, so a message
//! points at the row to fix. Relative CSR paths are relative to the inventory file's directory.
//! Lab fleets whose keys may be generated here use `--count` instead (no inventory).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The columns, in any order (`labels` may be left out).
pub const COLUMNS: [&str; 3] = ["id", "csr", "labels"];

/// One device of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRow {
    /// The line of the file it is on (1-based).
    pub line: u64,
    /// The device id (the Device's name and the certificate's name).
    pub id: String,
    /// The CSR file, resolved against the inventory's directory.
    pub csr: PathBuf,
    /// The device's own labels (added to the command's `--label`s, which they override).
    pub labels: BTreeMap<String, String>,
}

/// A row or the file is unusable: where, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {field}: {detail}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct InventoryError {
    /// The inventory file.
    pub path: PathBuf,
    /// The line, when the error is on one.
    pub line: Option<u64>,
    /// The column (or "header").
    pub field: String,
    /// What is wrong and the fix.
    pub detail: String,
}

/// Parse and check the inventory `text` read from `path` (pure: the caller reads the CSR files). Rejects a missing or unknown column, an empty file, an id that is not a
/// Kubernetes name, an id given twice, an empty CSR path and a label that is not `key=value`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<InventoryRow>, InventoryError> {
    let err = |line: Option<u64>, field: &str, detail: String| InventoryError {
        path: path.to_path_buf(),
        line,
        field: field.to_string(),
        detail,
    };
    let mut reader = csv::ReaderBuilder::new()
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .flexible(false)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| err(None, "header", e.to_string()))?
        .clone();
    let mut column = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        if !COLUMNS.contains(&name) {
            return Err(err(
                Some(1),
                "header",
                format!(
                    "unknown column {name:?}; the columns are {}",
                    COLUMNS.join(",")
                ),
            ));
        }
        if column.insert(name.to_string(), i).is_some() {
            return Err(err(
                Some(1),
                "header",
                format!("column {name:?} given twice"),
            ));
        }
    }
    for required in ["id", "csr"] {
        if !column.contains_key(required) {
            return Err(err(
                Some(1),
                "header",
                format!("no {required:?} column; the first line names the columns: id,csr,labels"),
            ));
        }
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rows: Vec<InventoryRow> = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| record_line(text, p.byte()));
            err(
                line,
                "row",
                format!("{e}; every row has one cell per column"),
            )
        })?;
        let line = record.position().map_or(0, |p| record_line(text, p.byte()));
        let cell = |name: &str| {
            column
                .get(name)
                .and_then(|&i| record.get(i))
                .unwrap_or_default()
        };
        let id = cell("id");
        if let Some(why) = name_problem(id) {
            return Err(err(Some(line), "id", format!("{id:?} {why}")));
        }
        if let Some(first) = seen.insert(id.to_string(), line) {
            return Err(err(
                Some(line),
                "id",
                format!("{id:?} is already on line {first}; give every device its own id"),
            ));
        }
        let csr = cell("csr");
        if csr.is_empty() {
            return Err(err(
                Some(line),
                "csr",
                "empty; give the path of the CSR the device made (`sealed-ota-agent keygen --csr-out`)".into(),
            ));
        }
        let labels =
            parse_labels(cell("labels")).map_err(|detail| err(Some(line), "labels", detail))?;
        rows.push(InventoryRow {
            line,
            id: id.to_string(),
            csr: base.join(csr),
            labels,
        });
    }
    if rows.is_empty() {
        return Err(err(
            None,
            "row",
            "no device in the inventory; add one row per device under the header id,csr,labels"
                .into(),
        ));
    }
    Ok(rows)
}

/// The line a record starting to parse at byte `start` is on: the reader's position is where it
/// began, before the blank and comment lines it skipped.
fn record_line(text: &str, start: u64) -> u64 {
    let start = usize::try_from(start).unwrap_or(text.len()).min(text.len());
    let mut line = text.as_bytes()[..start]
        .iter()
        .filter(|b| **b == b'\n')
        .count() as u64
        + 1;
    for skipped in text[start..].split('\n') {
        let skipped = skipped.trim_end_matches('\r');
        if !(skipped.is_empty() || skipped.starts_with('#')) {
            break;
        }
        line += 1;
    }
    line
}

/// Why `id` cannot name a Device (a DNS-1123 subdomain, which is also a valid MQTT topic level),
/// if it cannot.
fn name_problem(id: &str) -> Option<&'static str> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if id.is_empty() {
        Some("is empty; every device needs an id")
    } else if id.len() > 253 {
        Some("is longer than 253 characters")
    } else if !id.chars().all(|c| alnum(c) || c == '-' || c == '.') {
        Some("is not a Kubernetes name: use lowercase letters, digits, '-' and '.'")
    } else if !id.starts_with(alnum) || !id.ends_with(alnum) {
        Some("must start and end with a lowercase letter or a digit")
    } else {
        None
    }
}

/// `key=value;key=value` (empty: no labels).
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| format!("{pair:?} is not key=value; separate labels with ';'"))?;
        labels.insert(key.trim().to_string(), value.trim().to_string());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Result<Vec<InventoryRow>, InventoryError> {
        parse(Path::new("inv/devices.csv"), text)
    }

    fn failure(text: &str) -> (Option<u64>, String, String) {
        let e = parsed(text).expect_err("rejected");
        assert!(e.to_string().starts_with("inv/devices.csv"), "{e}");
        (e.line, e.field, e.detail)
    }

    #[test]
    fn rows_carry_their_line_their_resolved_csr_and_their_labels() {
        let rows = parsed(
            "# lab\nid,csr,labels\ngw-01,csr/gw-01.csr,site=berlin;tier=gold\n\n# next\ngw-02 , /abs/gw-02.csr ,\n",
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[0].csr, Path::new("inv/csr/gw-01.csr"));
        assert_eq!(
            rows[0].labels,
            BTreeMap::from([
                ("site".into(), "berlin".into()),
                ("tier".into(), "gold".into())
            ])
        );
        assert_eq!((rows[1].line, rows[1].id.as_str()), (6, "gw-02"));
        assert_eq!(rows[1].csr, Path::new("/abs/gw-02.csr"));
        assert!(rows[1].labels.is_empty());
        // Columns in any order, labels optional.
        let rows = parsed("csr,id\na.csr,gw-03\n").unwrap();
        assert_eq!(rows[0].id, "gw-03");
    }

    #[test]
    fn every_bad_field_is_named_with_its_line() {
        let (line, field, detail) = failure("id,csr,owner\ngw-01,a.csr,x\n");
        assert_eq!((line, field.as_str()), (Some(1), "header"));
        assert!(detail.contains("\"owner\""), "{detail}");
        let (_, field, detail) = failure("id,labels\ngw-01,\n");
        assert_eq!(field, "header");
        assert!(detail.contains("\"csr\""), "{detail}");
        let (line, field, _) = failure("id,csr\ngw-01,a.csr\nGW_02,b.csr\n");
        assert_eq!((line, field.as_str()), (Some(3), "id"));
        let (line, field, _) = failure("id,csr\n,a.csr\n");
        assert_eq!((line, field.as_str()), (Some(2), "id"));
        let (line, field, detail) = failure("id,csr\ngw-01,a.csr\ngw-01,b.csr\n");
        assert_eq!((line, field.as_str()), (Some(3), "id"));
        assert!(detail.contains("already on line 2"), "{detail}");
        let (line, field, _) = failure("id,csr\ngw-01,\n");
        assert_eq!((line, field.as_str()), (Some(2), "csr"));
        // Comment and blank lines count: the line is the row's own.
        let (line, field, _) = failure("id,csr\ngw-01,a.csr\n# next\n\r\ngw-02,\n");
        assert_eq!((line, field.as_str()), (Some(5), "csr"));
        let (line, field, detail) = failure("id,csr,labels\ngw-01,a.csr,site\n");
        assert_eq!((line, field.as_str()), (Some(2), "labels"));
        assert!(detail.contains("\"site\" is not key=value"), "{detail}");
        let (line, field, _) = failure("id,csr\ngw-01,a.csr,extra\n");
        assert_eq!((line, field.as_str()), (Some(2), "row"));
        let (line, field, _) = failure("id,csr\n# nobody yet\n");
        assert_eq!((line, field.as_str()), (None, "row"));
        let (_, field, _) = failure("");
        assert_eq!(field, "header");
    }
}
