//! How a command prints what it found: a table for people (the default) or the same data as JSON
//! or YAML for pipelines (`-o json|yaml`). Commands build their table rows; this module owns the
//! format flag and the serialisation, so every command group prints the same way.

use serde::Serialize;

use crate::error::{Error, Result};

/// `-o`, `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The command's data as pretty JSON.
    Json,
    /// The command's data as YAML.
    Yaml,
}

/// Print `data` as JSON or YAML, or, for [`Format::Table`], the rows and trailer `table` renders.
pub fn render<T: Serialize>(
    format: Format,
    data: &T,
    table: impl FnOnce() -> String,
) -> Result<String> {
    match format {
        Format::Table => Ok(table()),
        Format::Json => serde_json::to_string_pretty(data)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output(e.to_string())),
        Format::Yaml => serde_yaml::to_string(data).map_err(|e| Error::Output(e.to_string())),
    }
}

/// Rows as aligned columns (each column as wide as its widest cell, the last one free).
pub fn columns(rows: &[Vec<String>]) -> String {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_on_the_widest_cell_and_formats_carry_the_same_data() {
        let rows = vec![
            vec!["a".to_string(), "works".into(), "x".into()],
            vec!["longer".to_string(), "no".into(), "y z".into()],
        ];
        assert_eq!(columns(&rows), "a       works  x\nlonger  no     y z\n");
        let data = serde_json::json!({"k": [1, 2]});
        let json = render(Format::Json, &data, || unreachable!()).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            data
        );
        let yaml = render(Format::Yaml, &data, || unreachable!()).unwrap();
        assert_eq!(
            serde_yaml::from_str::<serde_json::Value>(&yaml).unwrap(),
            data
        );
        assert_eq!(render(Format::Table, &data, || "t".into()).unwrap(), "t");
    }
}
