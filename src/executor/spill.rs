//! Rows set aside for a reader that is not ready for them yet: in memory up to a budget, the
//! rest in a temporary file, taken back in the order they came.
//!
//! A stream of rows on the transaction's connection to a node puts its remaining rows here
//! when another part of the statement needs that connection (see `fragments.rs`). The file
//! lives in the data directory's `base/pgsql_tmp`, named like PostgreSQL's own temporary
//! files, and is unlinked as soon as it is open: it disappears when the spill is dropped or
//! the backend exits, whatever happens.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::executor::fragments::TextRow;

/// Where PostgreSQL keeps the temporary files of the default tablespace (relative to the data
/// directory, the backend's working directory).
const TEMP_DIR: &str = "base/pgsql_tmp";
/// The length written for a NULL value.
const NULL_LENGTH: u32 = u32::MAX;

pub struct Spill {
    /// The oldest rows, kept in memory.
    memory: VecDeque<TextRow>,
    memory_bytes: usize,
    /// How many bytes of rows may stay in memory.
    budget: usize,
    /// The newer rows, once memory was full.
    file: Option<SpillFile>,
    /// Where the file goes.
    dir: std::path::PathBuf,
}

enum SpillFile {
    Writing(BufWriter<File>),
    Reading(BufReader<File>),
}

impl Spill {
    pub fn new(budget: usize) -> Spill {
        Spill::in_dir(budget, TEMP_DIR.into())
    }

    fn in_dir(budget: usize, dir: std::path::PathBuf) -> Spill {
        Spill {
            memory: VecDeque::new(),
            memory_bytes: 0,
            budget,
            file: None,
            dir,
        }
    }

    /// Sets `row` aside behind the rows already here.
    pub fn push(&mut self, row: TextRow) -> std::io::Result<()> {
        let size = row_size(&row);
        if self.file.is_none() && self.memory_bytes + size <= self.budget {
            self.memory_bytes += size;
            self.memory.push_back(row);
            return Ok(());
        }
        if self.file.is_none() {
            let file = temporary_file(&self.dir)?;
            self.file = Some(SpillFile::Writing(BufWriter::new(file)));
        }
        match &mut self.file {
            Some(SpillFile::Writing(writer)) => write_row(writer, &row),
            _ => Err(std::io::Error::other(
                "rows added to a spill that is being read",
            )),
        }
    }

    /// The oldest row not taken yet. Once the file is being read, no rows may be added.
    pub fn pop(&mut self) -> std::io::Result<Option<TextRow>> {
        if let Some(row) = self.memory.pop_front() {
            self.memory_bytes -= row_size(&row);
            return Ok(Some(row));
        }
        if let Some(SpillFile::Writing(writer)) = &mut self.file {
            writer.flush()?;
            let mut file = writer.get_ref().try_clone()?;
            file.seek(SeekFrom::Start(0))?;
            self.file = Some(SpillFile::Reading(BufReader::new(file)));
        }
        match &mut self.file {
            Some(SpillFile::Reading(reader)) => read_row(reader),
            _ => Ok(None),
        }
    }
}

fn row_size(row: &TextRow) -> usize {
    row.iter()
        .map(|v| v.as_ref().map_or(0, String::len) + 24)
        .sum::<usize>()
        + 24
}

/// A new temporary file, already unlinked.
fn temporary_file(dir: &std::path::Path) -> std::io::Result<File> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(
        "pgsql_tmp{}.pgdist{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

fn write_row(writer: &mut impl Write, row: &TextRow) -> std::io::Result<()> {
    writer.write_all(&(row.len() as u32).to_le_bytes())?;
    for value in row {
        match value {
            Some(text) => {
                let length = u32::try_from(text.len())
                    .ok()
                    .filter(|l| *l != NULL_LENGTH)
                    .ok_or_else(|| std::io::Error::other("value too long"))?;
                writer.write_all(&length.to_le_bytes())?;
                writer.write_all(text.as_bytes())?;
            }
            None => writer.write_all(&NULL_LENGTH.to_le_bytes())?,
        }
    }
    Ok(())
}

/// The next row of the file, None at its end.
fn read_row(reader: &mut impl Read) -> std::io::Result<Option<TextRow>> {
    let mut word = [0u8; 4];
    match reader.read_exact(&mut word) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let columns = u32::from_le_bytes(word) as usize;
    let mut row = Vec::with_capacity(columns);
    for _ in 0..columns {
        reader.read_exact(&mut word)?;
        let length = u32::from_le_bytes(word);
        if length == NULL_LENGTH {
            row.push(None);
            continue;
        }
        let mut bytes = vec![0u8; length as usize];
        reader.read_exact(&mut bytes)?;
        let text = String::from_utf8(bytes).map_err(std::io::Error::other)?;
        row.push(Some(text));
    }
    Ok(Some(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_in_order_from_memory_then_file() {
        let dir = std::env::temp_dir().join(format!("pgdist-spill-test-{}", std::process::id()));
        let mut spill = Spill::in_dir(200, dir.clone());
        let rows: Vec<TextRow> = (0..100)
            .map(|i| vec![Some(format!("row {i}")), None, Some(String::new())])
            .collect();
        for row in &rows {
            spill.push(row.clone()).unwrap();
        }
        assert!(
            spill.file.is_some(),
            "the budget is far smaller than the rows"
        );
        let mut back = Vec::new();
        while let Some(row) = spill.pop().unwrap() {
            back.push(row);
        }
        assert_eq!(back, rows);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
