//! An external merge sort with bounded memory, for [`crate::bulk`].
//!
//! Records are `(key, position, seq, payload)` and come out ordered by `(key, position, seq)`.
//! Up to `budget` bytes are sorted in memory; beyond that each full buffer is sorted and written to
//! a *run* file in a scratch directory, and [`Sorter::finish`] merges the runs with a heap. Run files
//! are scratch derived from the log (I2): they are removed when the merge is dropped, and a crash
//! leaves only files the next replay's scratch directory clean-up deletes.
//!
//! Run file format, per record: u32 key length, key, u64 position, u32 seq, u32 payload length,
//! payload (all big-endian). A run file that ends mid-record is reported as a scratch error.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::ProjectionError;

/// One record to sort.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub key: Vec<u8>,
    pub position: u64,
    pub seq: u32,
    pub payload: Vec<u8>,
}

impl Record {
    fn order(&self) -> (&[u8], u64, u32) {
        (&self.key, self.position, self.seq)
    }

    /// Memory a buffered record costs, roughly: its bytes and its two vector headers.
    fn footprint(&self) -> usize {
        self.key.len() + self.payload.len() + 64
    }
}

impl Ord for Record {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order().cmp(&other.order())
    }
}

impl PartialOrd for Record {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn scratch_error(path: &Path, e: std::io::Error) -> ProjectionError {
    ProjectionError::Scratch {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Sorts records in memory up to a budget, spilling sorted runs to files beyond it.
pub(crate) struct Sorter {
    dir: PathBuf,
    name: &'static str,
    budget: usize,
    buffer: Vec<Record>,
    buffered: usize,
    runs: Vec<PathBuf>,
}

impl Sorter {
    /// A sorter whose runs are files `<dir>/<name>-<n>.run`.
    pub fn new(dir: &Path, name: &'static str, budget: usize) -> Self {
        Sorter {
            dir: dir.to_path_buf(),
            name,
            budget: budget.max(1),
            buffer: Vec::new(),
            buffered: 0,
            runs: Vec::new(),
        }
    }

    pub fn push(&mut self, record: Record) -> Result<(), ProjectionError> {
        self.buffered += record.footprint();
        self.buffer.push(record);
        if self.buffered >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<(), ProjectionError> {
        self.buffer.sort_unstable();
        let path = self
            .dir
            .join(format!("{}-{}.run", self.name, self.runs.len()));
        let file = File::create(&path).map_err(|e| scratch_error(&path, e))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        for r in self.buffer.drain(..) {
            write_record(&mut out, &r).map_err(|e| scratch_error(&path, e))?;
        }
        out.flush().map_err(|e| scratch_error(&path, e))?;
        self.runs.push(path);
        self.buffered = 0;
        Ok(())
    }

    /// Every record pushed, in order.
    pub fn finish(mut self) -> Result<Merge, ProjectionError> {
        if self.runs.is_empty() {
            self.buffer.sort_unstable();
            return Ok(Merge {
                memory: std::mem::take(&mut self.buffer).into_iter(),
                runs: Vec::new(),
                heap: BinaryHeap::new(),
                paths: Vec::new(),
            });
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        let mut runs = Vec::with_capacity(self.runs.len());
        let mut heap = BinaryHeap::with_capacity(self.runs.len());
        for (i, path) in self.runs.iter().enumerate() {
            let file = File::open(path).map_err(|e| scratch_error(path, e))?;
            let mut reader = BufReader::with_capacity(1 << 16, file);
            if let Some(r) = read_record(&mut reader).map_err(|e| scratch_error(path, e))? {
                heap.push(Reverse((r, i)));
            }
            runs.push(reader);
        }
        Ok(Merge {
            memory: Vec::new().into_iter(),
            runs,
            heap,
            paths: std::mem::take(&mut self.runs),
        })
    }
}

impl Drop for Sorter {
    fn drop(&mut self) {
        for p in &self.runs {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The sorted records of a [`Sorter`]; removes its run files when dropped.
pub(crate) struct Merge {
    memory: std::vec::IntoIter<Record>,
    runs: Vec<BufReader<File>>,
    heap: BinaryHeap<Reverse<(Record, usize)>>,
    paths: Vec<PathBuf>,
}

impl Merge {
    /// Run files being merged (0 when everything fit in memory).
    pub fn runs(&self) -> usize {
        self.paths.len()
    }
}

impl Iterator for Merge {
    type Item = Result<Record, ProjectionError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.paths.is_empty() {
            return self.memory.next().map(Ok);
        }
        let Reverse((record, i)) = self.heap.pop()?;
        let reader = self.runs.get_mut(i)?;
        match read_record(reader) {
            Ok(Some(next)) => self.heap.push(Reverse((next, i))),
            Ok(None) => {}
            Err(e) => {
                let path = self.paths.get(i).cloned().unwrap_or_default();
                self.heap.clear();
                return Some(Err(scratch_error(&path, e)));
            }
        }
        Some(Ok(record))
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn len_u32(n: usize) -> std::io::Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_be_bytes)
        .map_err(|_| std::io::Error::other("record field over 4 GiB"))
}

fn write_record(out: &mut impl Write, r: &Record) -> std::io::Result<()> {
    out.write_all(&len_u32(r.key.len())?)?;
    out.write_all(&r.key)?;
    out.write_all(&r.position.to_be_bytes())?;
    out.write_all(&r.seq.to_be_bytes())?;
    out.write_all(&len_u32(r.payload.len())?)?;
    out.write_all(&r.payload)
}

/// The next record, or `None` at a clean end of file.
fn read_record(input: &mut impl Read) -> std::io::Result<Option<Record>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut key = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut key)?;
    let mut position = [0u8; 8];
    input.read_exact(&mut position)?;
    let mut seq = [0u8; 4];
    input.read_exact(&mut seq)?;
    input.read_exact(&mut len)?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut payload)?;
    Ok(Some(Record {
        key,
        position: u64::from_be_bytes(position),
        seq: u32::from_be_bytes(seq),
        payload,
    }))
}
