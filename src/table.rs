//! Text tables: a header row, then each column as wide as its widest cell, two spaces apart.
//!
//! Widths count characters, not bytes (`∅`, `→` and names in other scripts are one column
//! each); the last column is not padded, so lines carry no trailing blanks.

use anyhow::Result;

use crate::print_line;

/// Rows collected under a header, printed aligned by [`Table::print`].
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
    right: Vec<bool>,
}

impl Table {
    /// A table with these column headers, every column left-aligned.
    pub(crate) fn new(header: &[&str]) -> Self {
        Table {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
            right: vec![false; header.len()],
        }
    }

    /// Aligns column `index` to the right (numbers).
    pub(crate) fn right(mut self, index: usize) -> Self {
        if let Some(r) = self.right.get_mut(index) {
            *r = true;
        }
        self
    }

    /// Adds a row; missing cells print empty.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The lines of the table, header first.
    pub(crate) fn lines(&self) -> Vec<String> {
        let columns = self.right.len();
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        self.rows
            .iter()
            .map(|row| {
                let mut line = String::new();
                for (i, width) in widths.iter().enumerate() {
                    let cell = row.get(i).map_or("", String::as_str);
                    let pad = width.saturating_sub(cell.chars().count());
                    let last = i + 1 == columns;
                    if i > 0 {
                        line.push_str("  ");
                    }
                    if self.right.get(i) == Some(&true) {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    } else {
                        line.push_str(cell);
                        if !last {
                            line.extend(std::iter::repeat_n(' ', pad));
                        }
                    }
                }
                line.truncate(line.trim_end().len());
                line
            })
            .collect()
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) -> Result<()> {
        for line in self.lines() {
            print_line(&line)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Table;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["POS", "NAME", "NOTE"]).right(0);
        t.row(vec!["7".into(), "∅ ünïcode".into(), "x".into()]);
        t.row(vec!["1234".into(), "a".into(), String::new()]);
        assert_eq!(
            t.lines(),
            [" POS  NAME       NOTE", "   7  ∅ ünïcode  x", "1234  a",]
        );
    }
}
