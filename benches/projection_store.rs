//! Issue 9 §7: the projections on sled 0.34.7 against redb 2.x, the same workload in one run.
//!
//! The workload is shaped like what caseledger's projections write and read at N events
//! (`CASELEDGER_BENCH_EVENTS`, default 1 000 000), with the key layout of
//! `crates/projections/src/keys.rs` in one key space (one sled tree, one redb table), as the
//! generation tree holds it:
//!
//! 1. **Bulk rebuild** (what `Engine::replay` writes): sorted sequential inserts in batches of
//!    512 — the form entries (`f` + form id, 160 B; ids random-looking, written in id order),
//!    the case rows keyed by owner (`c` + owner + case id, 700 B; N / 5 cases, at most 200 000,
//!    under 40 owners), their owner rows (`o`), the version rows (`v` + position, 560 B, one
//!    per event) and the `indexed_on` rows (`i` per case and `j` per form, + position + id, 16 B).
//!    sled: one `Batch` per 512, `Db::flush` at the end (its background flush every 500 ms in
//!    between, as the engine runs it). redb: one write transaction per 512, committed without
//!    durability, and durably every 500 ms and at the end (the same window as sled's flush).
//! 2. **Reads** (time travel and lists): 1 000 owner range scans of about 5 000 case rows (the
//!    `cases --user --at` pattern), 1 000 point reads (a case row, a form entry, a version row in
//!    turn), 100 ranges of 1 000 version rows from a random position. One read transaction per
//!    query for redb.
//! 3. **Live fold** (the forms bench's writes on the populated store): groups of 256 forms, each
//!    form reading and rewriting 2 random case rows, inserting its form entry at a random id, its
//!    version row (1 120 B) and `j` row at its position, an `i` row per case with the case's
//!    previous one removed, and the checkpoint; the group is one atomic write. Two variants:
//!    - *projections alone, durable*: sled `Batch` + `Db::flush` + `fdatasync` of its data file,
//!      against a redb write transaction with `Durability::Immediate`;
//!    - *with the log*: the group's 256 envelopes (1 000 B each) appended too, and only the log
//!      made durable per group, as the two-store design would: sled holds both trees in one
//!      `Db` (one flush + fdatasync, today's engine); with redb, the log stays on sled in its own
//!      `Db` (flush + fdatasync) and the projections commit without durability, durably every
//!      500 ms (a crash loses at most that, which the checkpoint and the log replace).
//! 4. **Open cost and memory**: each phase runs in a fresh child process (this binary re-executed
//!    with `CASELEDGER_BENCH_STORE_CHILD`): the time to open the populated store and the RSS
//!    after it, `VmHWM` of the rebuild, of the reads and of the live fold, the size on disk
//!    after the rebuild, and the open after a process that ended without closing the store
//!    (`std::process::exit` after its last durable commit: what a kill leaves).
//!
//! Both stores get a 64 MB cache (`EngineConfig::cache_capacity`); redb's default is 1 GB.
//! The values are filler: the real fold's CPU (decoding, folding, encoding) is not here, and the
//! projections of a sled store share their `Db` with the log, whose bytes this bench leaves out
//! (docs/PERFORMANCE.md says what that changes).
//!
//! `nice cargo bench --bench projection_store`; `CASELEDGER_BENCH_LIVE_FORMS` sets the forms of
//! each live variant (default 25 600, 100 groups), `CASELEDGER_BENCH_REDB_CACHE_MB` redb's cache
//! (default 64, as sled's). The run takes about a minute at the default N on two cores.

// The binary's allocator, so the figures are the ones `caseledger` gets.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{
    child_fields, dir_size, env_or, group, machine, memory_kb, mix, process_cpu_seconds,
    written_bytes, BenchResult, GROUPS,
};

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::TableDefinition;

/// Env var that turns this binary into a child: `<phase> <store> <dir>`.
const CHILD: &str = "CASELEDGER_BENCH_STORE_CHILD";
/// Rows per write while rebuilding (`crates/projections/src/bulk.rs`, `WRITE_BATCH`).
const WRITE_BATCH: usize = 512;
/// Forms per group commit in the live fold (the engine's group size under load).
const GROUP: usize = 256;
/// The engine's default cache, given to both stores.
const CACHE: usize = 64 << 20;
/// sled's background flush interval (its default, which the engine keeps); redb commits durably
/// as often where durability per write is not asked for.
const LAZY_DURABLE: Duration = Duration::from_millis(500);
/// A child that has not finished after this long is stopped and the run ends.
const CHILD_LIMIT: Duration = Duration::from_secs(900);
const SCANS: usize = 1000;
const POINTS: usize = 1000;
const RANGES: usize = 100;
const RANGE_ROWS: usize = 1000;
const CASE_BYTES: usize = 700;
const VERSION_BYTES: usize = 560;
const FORM_BYTES: usize = 160;
const INDEXED_BYTES: usize = 16;
const ENVELOPE_BYTES: usize = 1000;
/// Case blocks per live form (the forms bench's forms have two).
const BLOCKS: usize = 2;

const PROJ: TableDefinition<&[u8], &[u8]> = TableDefinition::new("proj");

// Id kinds, so that the id spaces differ.
const FORM_KIND: u64 = 0x0f0f;
const CASE_KIND: u64 = 0xcafe;
const LIVE_KIND: u64 = 0x1eaf;

/// splitmix64: a deterministic workload without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n.max(1)
    }
}

/// A UUID-shaped id whose first 16 hex digits are `v`: ids sort as their `v`, and the rest is
/// random-looking, like CommCare's v4 ids.
fn id_of(v: u64, salt: u64) -> String {
    let r = mix(v ^ salt);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:01x}{:02x}-{:012x}",
        v >> 32,
        (v >> 16) & 0xffff,
        (v >> 4) & 0xfff,
        v & 0xf,
        r & 0xff,
        (r >> 16) & 0xffff_ffff_ffff
    )
}

/// The `i`-th of `count` ids in sorted order, spread over the whole id space.
fn sorted_id(kind: u64, i: u64, count: u64) -> String {
    let stride = u64::MAX / count.max(1);
    id_of(i * stride + mix(i ^ kind) % stride, kind)
}

/// The workload's dimensions, a function of N alone, so that every child derives the same keys.
#[derive(Clone, Copy)]
struct Shape {
    events: u64,
    cases: u64,
}

impl Shape {
    fn new(events: u64) -> Self {
        let cases = (events / 5).clamp(GROUPS, 200_000) / GROUPS * GROUPS;
        Shape { events, cases }
    }

    fn per_owner(&self) -> u64 {
        self.cases / GROUPS
    }

    fn case_id(&self, rank: u64) -> String {
        let owner = rank / self.per_owner();
        sorted_id(CASE_KIND ^ owner, rank % self.per_owner(), self.per_owner())
    }

    /// The row of the case of global rank `rank` (owner-major, then case id).
    fn case_key(&self, rank: u64) -> Vec<u8> {
        let mut k = case_prefix(&group(rank / self.per_owner()));
        k.extend_from_slice(self.case_id(rank).as_bytes());
        k
    }

    /// The position of the case's last change as the rebuild writes it (the last `cases`
    /// positions, in rank order).
    fn last_change(&self, rank: u64) -> u64 {
        self.events - self.cases + 1 + rank
    }
}

/// `c` + u32 BE owner length + owner: the prefix of an owner's case rows (`keys::case_prefix`).
fn case_prefix(owner: &str) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(&(owner.len() as u32).to_be_bytes());
    k.extend_from_slice(owner.as_bytes());
    k
}

fn prefixed(prefix: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id.as_bytes());
    k
}

fn positioned(prefix: u8, position: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + id.len());
    k.push(prefix);
    k.extend_from_slice(&position.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Filler bytes that differ from row to row.
fn value(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    let mut i = seed;
    while v.len() < len {
        i = i.wrapping_add(1);
        v.extend_from_slice(&mix(i).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// One write of a batch: insert, or remove when the value is `None`.
type Op = (Vec<u8>, Option<Vec<u8>>);

/// How a write must be committed.
#[derive(Clone, Copy, PartialEq)]
enum Commit {
    /// Durable when the call returns.
    Durable,
    /// Atomic; durable within `LAZY_DURABLE` (sled's background flush, redb's periodic durable
    /// commit).
    Lazy,
}

/// A projection store under test.
enum Store {
    Sled {
        db: sled::Db,
        tree: sled::Tree,
        /// The data file, for the `fdatasync` a durable group commit does after `Db::flush`.
        data: std::fs::File,
    },
    Redb {
        db: redb::Database,
        last_durable: Instant,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Sled,
    Redb,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Sled => "sled",
            Kind::Redb => "redb",
        }
    }

    fn parse(s: &str) -> BenchResult<Self> {
        match s {
            "sled" => Ok(Kind::Sled),
            "redb" => Ok(Kind::Redb),
            other => Err(format!("unknown store {other}").into()),
        }
    }
}

impl Store {
    /// Opens (or creates) the store of `kind` in `dir`.
    fn open(kind: Kind, dir: &Path) -> BenchResult<Store> {
        match kind {
            Kind::Sled => {
                let db = sled::Config::new()
                    .path(dir)
                    .cache_capacity(CACHE as u64)
                    .open()?;
                let tree = db.open_tree("proj")?;
                let data = std::fs::File::open(dir.join("db"))?;
                Ok(Store::Sled { db, tree, data })
            }
            Kind::Redb => {
                std::fs::create_dir_all(dir)?;
                // CASELEDGER_BENCH_REDB_CACHE_MB gives redb another cache, to explore.
                let cache_mb: usize = env_or("CASELEDGER_BENCH_REDB_CACHE_MB", CACHE >> 20)?;
                let db = redb::Database::builder()
                    .set_cache_size(cache_mb << 20)
                    .create(dir.join("proj.redb"))?;
                Ok(Store::Redb {
                    db,
                    last_durable: Instant::now(),
                })
            }
        }
    }

    /// Writes `ops` atomically.
    fn apply(&mut self, ops: Vec<Op>, commit: Commit) -> BenchResult<()> {
        match self {
            Store::Sled { db, tree, data } => {
                let mut batch = sled::Batch::default();
                for (k, v) in ops {
                    match v {
                        Some(v) => batch.insert(k, v),
                        None => batch.remove(k),
                    }
                }
                tree.apply_batch(batch)?;
                if commit == Commit::Durable {
                    db.flush()?;
                    data.sync_data()?;
                }
            }
            Store::Redb { db, last_durable } => {
                let mut tx = db.begin_write()?;
                let durable = commit == Commit::Durable || last_durable.elapsed() >= LAZY_DURABLE;
                tx.set_durability(if durable {
                    redb::Durability::Immediate
                } else {
                    redb::Durability::None
                });
                {
                    let mut table = tx.open_table(PROJ)?;
                    for (k, v) in &ops {
                        match v {
                            Some(v) => {
                                table.insert(k.as_slice(), v.as_slice())?;
                            }
                            None => {
                                table.remove(k.as_slice())?;
                            }
                        }
                    }
                }
                tx.commit()?;
                if durable {
                    *last_durable = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Makes every write so far durable.
    fn sync(&mut self) -> BenchResult<()> {
        match self {
            Store::Sled { db, data, .. } => {
                db.flush()?;
                data.sync_data()?;
            }
            Store::Redb { .. } => self.apply(Vec::new(), Commit::Durable)?,
        }
        Ok(())
    }

    /// Point reads: the bytes found.
    fn get_many(&self, keys: &[Vec<u8>]) -> BenchResult<usize> {
        let mut bytes = 0;
        match self {
            Store::Sled { tree, .. } => {
                for k in keys {
                    bytes += tree.get(k)?.map_or(0, |v| v.len());
                }
            }
            Store::Redb { db, .. } => {
                let tx = db.begin_read()?;
                let table = tx.open_table(PROJ)?;
                for k in keys {
                    bytes += table.get(k.as_slice())?.map_or(0, |v| v.value().len());
                }
            }
        }
        Ok(bytes)
    }

    /// Rows from `start` (inclusive) to `end` (exclusive), at most `limit`: (rows, bytes).
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> BenchResult<(usize, usize)> {
        let (mut rows, mut bytes) = (0, 0);
        match self {
            Store::Sled { tree, .. } => {
                for kv in tree.range(start..end).take(limit) {
                    let (k, v) = kv?;
                    rows += 1;
                    bytes += k.len() + v.len();
                }
            }
            Store::Redb { db, .. } => {
                let tx = db.begin_read()?;
                let table = tx.open_table(PROJ)?;
                for kv in table.range(start..end)?.take(limit) {
                    let (k, v) = kv?;
                    rows += 1;
                    bytes += k.value().len() + v.value().len();
                }
            }
        }
        Ok((rows, bytes))
    }
}

/// Writes sorted rows in batches of `WRITE_BATCH`, as the bulk rebuild's writer does.
struct Writer<'s> {
    store: &'s mut Store,
    ops: Vec<Op>,
    rows: u64,
}

impl Writer<'_> {
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> BenchResult<()> {
        self.ops.push((key, Some(value)));
        self.rows += 1;
        if self.ops.len() >= WRITE_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> BenchResult<()> {
        if !self.ops.is_empty() {
            self.store
                .apply(std::mem::take(&mut self.ops), Commit::Lazy)?;
        }
        Ok(())
    }
}

/// Phase 1 in a fresh process: create the store and write what a rebuild writes.
/// Prints `build <seconds> <rows> <VmHWM kB> <RSS kB>`.
fn build_child(kind: Kind, dir: &Path, shape: Shape) -> BenchResult<()> {
    let started = Instant::now();
    let mut store = Store::open(kind, dir)?;
    let mut w = Writer {
        store: &mut store,
        ops: Vec::with_capacity(WRITE_BATCH),
        rows: 0,
    };
    // Phase 2 of the rebuild: form entries in form-id order.
    for i in 0..shape.events {
        w.insert(
            prefixed(b'f', &sorted_id(FORM_KIND, i, shape.events)),
            value(FORM_BYTES, i),
        )?;
    }
    // Phase 3: the case rows keyed by owner, in key order; then the owner rows in case-id order.
    for rank in 0..shape.cases {
        w.insert(shape.case_key(rank), value(CASE_BYTES, rank))?;
    }
    w.flush()?;
    let mut owners: Vec<(String, u64)> = (0..shape.cases)
        .map(|rank| (shape.case_id(rank), rank / shape.per_owner()))
        .collect();
    owners.sort_unstable();
    for (id, owner) in owners {
        w.insert(prefixed(b'o', &id), group(owner).into_bytes())?;
    }
    // The version rows by position, then the `indexed_on` rows (phase 4).
    for position in 1..=shape.events {
        w.insert(
            positioned(b'v', position, ""),
            value(VERSION_BYTES, position),
        )?;
    }
    for rank in 0..shape.cases {
        w.insert(
            positioned(b'i', shape.last_change(rank), &shape.case_id(rank)),
            value(INDEXED_BYTES, rank),
        )?;
    }
    for position in 1..=shape.events {
        w.insert(
            positioned(b'j', position, &id_of(mix(position), FORM_KIND)),
            value(INDEXED_BYTES, position),
        )?;
    }
    w.insert(b"K".to_vec(), shape.events.to_be_bytes().to_vec())?;
    w.flush()?;
    let rows = w.rows;
    store.sync()?;
    let seconds = started.elapsed().as_secs_f64();
    let (rss, peak) = memory_kb();
    drop(store);
    writeln!(
        std::io::stdout().lock(),
        "build {seconds} {rows} {peak} {rss}"
    )?;
    Ok(())
}

/// Opens the populated store, timed: (store, seconds, RSS kB after).
fn open_timed(kind: Kind, dir: &Path) -> BenchResult<(Store, f64, u64)> {
    let started = Instant::now();
    let store = Store::open(kind, dir)?;
    let seconds = started.elapsed().as_secs_f64();
    let (rss, _) = memory_kb();
    Ok((store, seconds, rss))
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    (at(0.5), at(0.99))
}

/// Phase 2 in a fresh process. Prints `reads <open s> <RSS after open kB> <scan p50 ms> <scan
/// p99> <rows per scan> <point p50> <point p99> <range p50> <range p99> <VmHWM kB>`.
fn reads_child(kind: Kind, dir: &Path, shape: Shape) -> BenchResult<()> {
    let (store, open_seconds, open_rss) = open_timed(kind, dir)?;
    let mut rng = Rng(0x5ca7);
    let mut scans = Vec::with_capacity(SCANS);
    let mut rows = 0usize;
    for _ in 0..SCANS {
        let owner = group(rng.below(GROUPS));
        let start = case_prefix(&owner);
        let mut end = start.clone();
        end.push(0xff);
        let t = Instant::now();
        let (n, _) = store.scan(&start, &end, usize::MAX)?;
        scans.push(t.elapsed());
        rows += n;
    }
    let mut points = Vec::with_capacity(POINTS);
    let mut found = 0usize;
    for i in 0..POINTS {
        let key = match i % 3 {
            0 => shape.case_key(rng.below(shape.cases)),
            1 => prefixed(
                b'f',
                &sorted_id(FORM_KIND, rng.below(shape.events), shape.events),
            ),
            _ => positioned(b'v', 1 + rng.below(shape.events), ""),
        };
        let t = Instant::now();
        let bytes = store.get_many(std::slice::from_ref(&key))?;
        points.push(t.elapsed());
        found += usize::from(bytes > 0);
    }
    let mut ranges = Vec::with_capacity(RANGES);
    for _ in 0..RANGES {
        let from = 1 + rng.below(shape.events.saturating_sub(RANGE_ROWS as u64));
        let start = positioned(b'v', from, "");
        let t = Instant::now();
        store.scan(&start, b"w", RANGE_ROWS)?;
        ranges.push(t.elapsed());
    }
    if found != POINTS {
        return Err(format!("point reads found {found} of {POINTS}").into());
    }
    let (_, peak) = memory_kb();
    let (s50, s99) = percentiles(scans);
    let (p50, p99) = percentiles(points);
    let (r50, r99) = percentiles(ranges);
    writeln!(
        std::io::stdout().lock(),
        "reads {open_seconds} {open_rss} {s50} {s99} {} {p50} {p99} {r50} {r99} {peak}",
        rows / SCANS
    )?;
    Ok(())
}

/// The projection writes of one live group of `GROUP` forms from position `first`.
fn live_group(
    shape: Shape,
    rng: &mut Rng,
    first: u64,
    last_change: &mut std::collections::HashMap<u64, u64>,
    reads: &mut Vec<Vec<u8>>,
) -> Vec<Op> {
    let mut ops = Vec::with_capacity(GROUP * 8);
    reads.clear();
    for position in first..first + GROUP as u64 {
        let form = id_of(mix(position ^ LIVE_KIND), LIVE_KIND);
        ops.push((prefixed(b'f', &form), Some(value(FORM_BYTES, position))));
        for _ in 0..BLOCKS {
            let rank = rng.below(shape.cases);
            let key = shape.case_key(rank);
            reads.push(key.clone());
            ops.push((key, Some(value(CASE_BYTES, position))));
            let id = shape.case_id(rank);
            let before = last_change
                .insert(rank, position)
                .unwrap_or_else(|| shape.last_change(rank));
            ops.push((positioned(b'i', before, &id), None));
            ops.push((
                positioned(b'i', position, &id),
                Some(value(INDEXED_BYTES, position)),
            ));
        }
        ops.push((
            positioned(b'j', position, &form),
            Some(value(INDEXED_BYTES, position)),
        ));
        ops.push((
            positioned(b'v', position, ""),
            Some(value(VERSION_BYTES * BLOCKS, position)),
        ));
    }
    ops.push((
        b"K".to_vec(),
        Some((first + GROUP as u64 - 1).to_be_bytes().to_vec()),
    ));
    ops
}

/// Phase 3 in a fresh process on the populated store: both live variants, then the process
/// ends without closing the store. Prints `live <durable forms/s> <with log forms/s> <VmHWM kB>
/// <CPU µs per form, durable> <CPU µs per form, with the log> <kB written per form, with the
/// log>`.
fn live_child(kind: Kind, dir: &Path, shape: Shape) -> BenchResult<()> {
    let forms: u64 = env_or("CASELEDGER_BENCH_LIVE_FORMS", 25_600)?;
    let groups = (forms / GROUP as u64).max(1);
    let (mut store, _, _) = open_timed(kind, dir)?;
    let mut rng = Rng(0x11fe);
    let mut last_change = std::collections::HashMap::new();
    let mut reads = Vec::new();
    let mut position = shape.events + 1;

    // Projections alone, each group durable.
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    for _ in 0..groups {
        let ops = live_group(shape, &mut rng, position, &mut last_change, &mut reads);
        // The fold reads the cases it updates before writing them.
        store.get_many(&reads)?;
        store.apply(ops, Commit::Durable)?;
        position += GROUP as u64;
    }
    let durable_rate = (groups * GROUP as u64) as f64 / started.elapsed().as_secs_f64();
    let durable_cpu = (process_cpu_seconds() - cpu) * 1e6 / (groups * GROUP as u64) as f64;

    // With the log: the log durable per group, the projections as the design would commit them.
    let log_dir = dir.join("log");
    let (log_db, log_data) = match &store {
        Store::Sled { db, .. } => (db.clone(), std::fs::File::open(dir.join("db"))?),
        Store::Redb { .. } => {
            let db = sled::Config::new()
                .path(&log_dir)
                .cache_capacity(CACHE as u64)
                .open()?;
            let data = std::fs::File::open(log_dir.join("db"))?;
            (db, data)
        }
    };
    let log = log_db.open_tree("log")?;
    let written = written_bytes();
    let cpu = process_cpu_seconds();
    let started = Instant::now();
    for _ in 0..groups {
        let ops = live_group(shape, &mut rng, position, &mut last_change, &mut reads);
        store.get_many(&reads)?;
        let mut batch = sled::Batch::default();
        for p in position..position + GROUP as u64 {
            batch.insert(&p.to_be_bytes(), value(ENVELOPE_BYTES, p));
        }
        log.apply_batch(batch)?;
        if matches!(store, Store::Sled { .. }) {
            // One Db: the projections' batch goes in before the one flush makes both durable.
            store.apply(ops, Commit::Lazy)?;
            log_db.flush()?;
            log_data.sync_data()?;
        } else {
            // Two stores: the log durable first, then the projections and their checkpoint.
            log_db.flush()?;
            log_data.sync_data()?;
            store.apply(ops, Commit::Lazy)?;
        }
        position += GROUP as u64;
    }
    let with_log_rate = (groups * GROUP as u64) as f64 / started.elapsed().as_secs_f64();
    let with_log_cpu = (process_cpu_seconds() - cpu) * 1e6 / (groups * GROUP as u64) as f64;
    let with_log_kb = (written_bytes() - written) as f64 / 1024.0 / (groups * GROUP as u64) as f64;
    store.sync()?;
    log_db.flush()?;
    let (_, peak) = memory_kb();
    writeln!(
        std::io::stdout().lock(),
        "live {durable_rate} {with_log_rate} {peak} {durable_cpu} {with_log_cpu} {with_log_kb}"
    )?;
    std::io::stdout().lock().flush()?;
    // What a kill after the last durable commit leaves: no destructor runs, so neither store is
    // closed cleanly (redb records a clean close only on drop).
    std::process::exit(0)
}

/// Phase 4: open the store a killed process left, and read one row (an open that defers its
/// recovery pays it there). Prints `reopen <seconds> <RSS kB>`.
fn reopen_child(kind: Kind, dir: &Path) -> BenchResult<()> {
    let started = Instant::now();
    let store = Store::open(kind, dir)?;
    store.get_many(&[b"K".to_vec()])?;
    let seconds = started.elapsed().as_secs_f64();
    let (rss, _) = memory_kb();
    drop(store);
    writeln!(std::io::stdout().lock(), "reopen {seconds} {rss}")?;
    Ok(())
}

fn child(spec: &str) -> BenchResult<()> {
    let mut parts = spec.splitn(3, ' ');
    let (Some(phase), Some(kind), Some(dir)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("bad {CHILD}: {spec}").into());
    };
    let kind = Kind::parse(kind)?;
    let dir = Path::new(dir);
    let shape = Shape::new(env_or("CASELEDGER_BENCH_EVENTS", 1_000_000)?);
    match phase {
        "build" => build_child(kind, dir, shape),
        "reads" => reads_child(kind, dir, shape),
        "live" => live_child(kind, dir, shape),
        "reopen" => reopen_child(kind, dir),
        other => Err(format!("unknown phase {other}").into()),
    }
}

/// Runs `phase` for `kind` on `dir` in a fresh process and returns the numbers it printed.
fn run_child(phase: &str, kind: Kind, dir: &Path, n: u64) -> BenchResult<Vec<f64>> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--bench")
        .env(CHILD, format!("{phase} {} {}", kind.name(), dir.display()))
        .env("CASELEDGER_BENCH_EVENTS", n.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > CHILD_LIMIT {
            child.kill()?;
            child.wait()?;
            return Err(format!("{phase} {} took more than {CHILD_LIMIT:?}", kind.name()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut stdout)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut stderr)?;
    }
    let fields = child_fields(&stdout, phase);
    if !status.success() || fields.is_empty() {
        return Err(format!(
            "{phase} {} failed ({status}): {stdout}{stderr}",
            kind.name()
        )
        .into());
    }
    Ok(fields)
}

/// One figure of both stores.
struct Figure {
    name: &'static str,
    unit: &'static str,
    sled: f64,
    redb: f64,
    /// Whether a lower value is better.
    lower: bool,
}

impl Figure {
    fn redb_better(&self) -> bool {
        if self.lower {
            self.redb < self.sled
        } else {
            self.redb > self.sled
        }
    }
}

fn main() -> BenchResult<()> {
    if let Ok(spec) = std::env::var(CHILD) {
        return child(&spec);
    }
    let n: u64 = env_or("CASELEDGER_BENCH_EVENTS", 1_000_000)?;
    let shape = Shape::new(n);
    let mut out = std::io::stdout().lock();
    writeln!(out, "projection_store: {}", machine())?;
    writeln!(
        out,
        "workload: N = {n} events: {} form entries ({FORM_BYTES} B), {} case rows ({CASE_BYTES} B) under {GROUPS} owners ({} each) and their owner rows, {n} version rows ({VERSION_BYTES} B), {} indexed rows ({INDEXED_BYTES} B); rebuild in sorted batches of {WRITE_BATCH}; cache: sled {} MB, redb {} MB; sled 0.34.7, redb 2.6",
        n,
        shape.cases,
        shape.per_owner(),
        shape.cases + n,
        CACHE >> 20,
        env_or("CASELEDGER_BENCH_REDB_CACHE_MB", CACHE >> 20)?
    )?;
    out.flush()?;
    let root = tempfile::tempdir()?;
    let dirs: Vec<(Kind, PathBuf)> = [Kind::Sled, Kind::Redb]
        .into_iter()
        .map(|k| (k, root.path().join(k.name())))
        .collect();
    let mut build = Vec::new();
    let mut disk = Vec::new();
    for (kind, dir) in &dirs {
        build.push(run_child("build", *kind, dir, n)?);
        disk.push(dir_size(dir) as f64 / 1e6);
    }
    let mut reads = Vec::new();
    for (kind, dir) in &dirs {
        reads.push(run_child("reads", *kind, dir, n)?);
    }
    let mut live = Vec::new();
    for (kind, dir) in &dirs {
        live.push(run_child("live", *kind, dir, n)?);
    }
    let mut reopen = Vec::new();
    for (kind, dir) in &dirs {
        reopen.push(run_child("reopen", *kind, dir, n)?);
    }
    let get = |v: &Vec<Vec<f64>>, store: usize, i: usize| -> f64 {
        v.get(store)
            .and_then(|f| f.get(i))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let rows = get(&build, 0, 1);
    let per_scan = get(&reads, 0, 4);
    let fig = |name, unit, v: &Vec<Vec<f64>>, i: usize, scale: f64, lower| Figure {
        name,
        unit,
        sled: get(v, 0, i) * scale,
        redb: get(v, 1, i) * scale,
        lower,
    };
    let mb = 1.0 / 1024.0;
    let figures = [
        fig("rebuild write, fresh process", "s", &build, 0, 1.0, true),
        fig("rebuild peak RSS (VmHWM)", "MB", &build, 2, mb, true),
        Figure {
            name: "on disk after the rebuild",
            unit: "MB",
            sled: disk.first().copied().unwrap_or(f64::NAN),
            redb: disk.get(1).copied().unwrap_or(f64::NAN),
            lower: true,
        },
        fig("open the populated store", "s", &reads, 0, 1.0, true),
        fig("RSS after open", "MB", &reads, 1, mb, true),
        fig("owner range scan p50", "ms", &reads, 2, 1.0, true),
        fig("owner range scan p99", "ms", &reads, 3, 1.0, true),
        fig("point read p50", "ms", &reads, 5, 1.0, true),
        fig("point read p99", "ms", &reads, 6, 1.0, true),
        fig("1000-row position range p50", "ms", &reads, 7, 1.0, true),
        fig("1000-row position range p99", "ms", &reads, 8, 1.0, true),
        fig("reads peak RSS (VmHWM)", "MB", &reads, 9, mb, true),
        fig(
            "live fold, projections alone, durable",
            "forms/s",
            &live,
            0,
            1.0,
            false,
        ),
        fig(
            "live fold with the log durable",
            "forms/s",
            &live,
            1,
            1.0,
            false,
        ),
        fig("live fold peak RSS (VmHWM)", "MB", &live, 2, mb, true),
        fig(
            "live CPU per form, projections alone",
            "µs",
            &live,
            3,
            1.0,
            true,
        ),
        fig("live CPU per form, with the log", "µs", &live, 4, 1.0, true),
        fig(
            "live disk writes per form, with the log",
            "kB",
            &live,
            5,
            1.0,
            true,
        ),
        fig("open after a killed process", "s", &reopen, 0, 1.0, true),
        fig("RSS after that open", "MB", &reopen, 1, mb, true),
    ];
    writeln!(
        out,
        "rebuild: {rows} rows each; owner scans: {per_scan} rows each, {SCANS} scans; {POINTS} point reads; {RANGES} ranges of {RANGE_ROWS} version rows; live fold: groups of {GROUP} forms"
    )?;
    writeln!(
        out,
        "  {:<40} {:>18} {:>18} {:>10}",
        "figure", "sled 0.34.7", "redb 2.6", "redb/sled"
    )?;
    for f in &figures {
        writeln!(
            out,
            "  {:<40} {:>18} {:>18} {:>10.2}{}",
            f.name,
            format!("{:.3} {}", f.sled, f.unit),
            format!("{:.3} {}", f.redb, f.unit),
            f.redb / f.sled,
            if f.redb_better() { "  redb better" } else { "" }
        )?;
    }
    // The §7 figures are the rebuild (time and peak), durable forms/s as the system commits them,
    // and what opening costs; time travel is the reads. redb is worth adopting only if it does
    // not lose any §7 figure and keeps the time-travel reads within 1.5 times sled's.
    let section7 = [0usize, 1, 4, 13];
    let reads_ok = [5usize, 6, 7, 8, 9, 10].iter().all(|&i| {
        figures
            .get(i)
            .is_some_and(|f| f.redb <= 1.5 * f.sled || f.redb_better())
    });
    let wins = figures.iter().filter(|f| f.redb_better()).count();
    let lost: Vec<&str> = section7
        .iter()
        .filter_map(|&i| figures.get(i))
        .filter(|f| !f.redb_better())
        .map(|f| f.name)
        .collect();
    let adopt = lost.is_empty() && reads_ok;
    writeln!(
        out,
        "verdict: redb better on {wins} of {} figures; §7 figures redb loses: {}; time-travel reads within 1.5x of sled: {}; {}",
        figures.len(),
        if lost.is_empty() {
            "none".to_owned()
        } else {
            lost.join(", ")
        },
        if reads_ok { "yes" } else { "no" },
        if adopt {
            "ADOPT redb for the projections"
        } else {
            "KEEP sled for the projections"
        }
    )?;
    Ok(())
}
