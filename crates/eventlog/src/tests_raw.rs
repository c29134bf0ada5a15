//! Raw submissions stored out of line (`raw.rs`, envelope format 4): what is written where, read
//! back, verified, moved by verbatim appends, and how opening fits the files to the log after a
//! crash or damage.

use std::path::PathBuf;

use domain::{
    Actions, BlockApplied, CaseId, CommandId, Event, FormAcceptedV1, FormId, FormRecord, Position,
    RawBytes, Timestamp, UserCreatedV1, UserId,
};
use sha2::{Digest, Sha256};

use crate::tests::{domain, open, open_db};
use crate::{
    decode_header, AppendRequest, Expected, LogConfig, LogError, SledLog, VerbatimEntry,
    DETACHED_FORMAT, ENVELOPE_FORMAT,
};

fn raw_of(i: u64) -> Vec<u8> {
    format!(
        "<data xmlns=\"http://openrosa.org/formdesigner/x\"><n>{i}</n>{}</data>",
        "q".repeat(400)
    )
    .into_bytes()
}

fn form(i: u64) -> Event {
    let raw = raw_of(i);
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(format!("f-{i}")),
            xmlns: "http://openrosa.org/formdesigner/x".into(),
            app_id: None,
            user_id: Some("u-david".into()),
            content_hash: Sha256::digest(&raw).into(),
            raw: raw.into(),
        },
        blocks: vec![BlockApplied {
            case_id: CaseId::new(format!("c-{i}")),
            date: Timestamp(1_772_432_122_104),
            user: "u-david".into(),
            actions: Actions::default(),
        }],
    })
}

fn user(i: u64) -> Event {
    Event::UserCreatedV1(UserCreatedV1 {
        user_id: UserId::new(format!("u-{i}")),
        username: format!("user{i}"),
    })
}

fn req(events: Vec<Event>) -> AppendRequest {
    AppendRequest {
        expected: Expected::Any,
        idempotency_key: None,
        command_id: CommandId::new("cmd"),
        recorded_at: Timestamp(1),
        events,
    }
}

fn raw_dir(dir: &tempfile::TempDir) -> PathBuf {
    crate::raw::raw_dir(dir.path())
}

/// A log with raw files: a user, then forms 2..=n (positions 1..=n).
fn written(dir: &tempfile::TempDir, n: u64) -> (sled::Db, SledLog) {
    let (db, log) = open(dir);
    log.store_raw_in(&raw_dir(dir), true).expect("raw files");
    let mut events = vec![user(1)];
    events.extend((2..=n).map(form));
    log.write(req(events)).expect("write");
    log.flush_blocking().expect("flush");
    (db, log)
}

fn reopen(dir: &tempfile::TempDir) -> Result<(sled::Db, SledLog), LogError> {
    let db = open_db(dir);
    let log = SledLog::open(&db, &domain(), LogConfig::default()).expect("open log");
    log.store_raw_in(&raw_dir(dir), true)?;
    Ok((db, log))
}

fn data_file(dir: &tempfile::TempDir) -> PathBuf {
    raw_dir(dir).join("demo.dat")
}

fn index_file(dir: &tempfile::TempDir) -> PathBuf {
    raw_dir(dir).join("demo.idx")
}

#[test]
fn a_forms_bytes_go_to_the_raw_files_and_its_envelope_names_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = written(&dir, 3);
    let tree = db.open_tree("log/demo").expect("tree");
    let user_envelope = tree.get(1u64.to_be_bytes()).expect("get").expect("user");
    assert_eq!(
        decode_header(&user_envelope).expect("header").format,
        ENVELOPE_FORMAT
    );
    let envelope = tree.get(2u64.to_be_bytes()).expect("get").expect("form");
    let header = decode_header(&envelope).expect("header");
    assert_eq!(header.format, DETACHED_FORMAT);
    let named = header.raw.expect("names its raw submission");
    assert_eq!(named.len, raw_of(2).len() as u64);
    assert_eq!(named.hash, <[u8; 32]>::from(Sha256::digest(raw_of(2))));
    assert!(
        envelope.len() < raw_of(2).len() / 2,
        "the envelope ({} bytes) does not hold the {} raw bytes",
        envelope.len(),
        raw_of(2).len()
    );

    let event = log.read_at(Position(2)).expect("read").expect("event");
    let record = event.event.form_record().expect("form");
    assert_eq!(record.raw, RawBytes::Detached { len: named.len });
    assert_eq!(
        log.raw_bytes(Position(2), record).expect("bytes"),
        raw_of(2)
    );
    let whole = log
        .read_at_with_raw(Position(3))
        .expect("read")
        .expect("event");
    assert_eq!(whole.event, form(3));
    // Iteration reads the facts only.
    let read: Vec<_> = log
        .iter_from(Position(1))
        .collect::<Result<_, _>>()
        .expect("iter");
    assert!(read[1..]
        .iter()
        .all(|e| e.event.form_record().is_some_and(|f| f.raw.is_detached())));
    let verified = log.verify(Position::ZERO).expect("verify");
    assert_eq!(verified.entries, 3);
    assert!(
        verified.bytes > 2 * raw_of(2).len() as u64,
        "raw bytes hashed too"
    );
}

#[test]
fn an_append_whose_content_hash_is_not_its_bytes_hash_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_db, log) = written(&dir, 2);
    let mut bad = form(3);
    if let Some(f) = bad.form_record_mut() {
        f.content_hash = [7; 32];
    }
    let err = log.write(req(vec![form(4), bad])).expect_err("refused");
    assert!(matches!(err, LogError::Encode(_)), "{err:?}");
    assert_eq!(
        log.written_head(),
        Position(2),
        "nothing of the append written"
    );
    log.write(req(vec![form(5)])).expect("the next append");
    log.flush_blocking().expect("flush");
    assert_eq!(
        log.read_at_with_raw(Position(3))
            .expect("read")
            .expect("event")
            .event,
        form(5)
    );
}

#[test]
fn opening_cuts_off_raw_records_an_unacknowledged_append_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = written(&dir, 4);
    drop((log, db));
    // A crash between the raw write and the sled batch: records and entries past the head.
    let mut data = std::fs::read(data_file(&dir)).expect("read");
    let kept = data.len();
    data.extend_from_slice(&5u64.to_le_bytes());
    data.extend_from_slice(&3u32.to_le_bytes());
    data.extend_from_slice(&[9; 35]);
    std::fs::write(data_file(&dir), &data).expect("write");
    let mut index = std::fs::read(index_file(&dir)).expect("read");
    index.extend_from_slice(&(kept as u64 + 1).to_le_bytes());
    std::fs::write(index_file(&dir), &index).expect("write");

    let (_db, log) = reopen(&dir).expect("reopen");
    assert_eq!(
        std::fs::metadata(data_file(&dir)).expect("meta").len(),
        kept as u64
    );
    assert_eq!(
        std::fs::metadata(index_file(&dir)).expect("meta").len(),
        4 * 8
    );
    log.write(req(vec![form(9)])).expect("append");
    log.flush_blocking().expect("flush");
    assert_eq!(
        log.read_at_with_raw(Position(5))
            .expect("read")
            .expect("event")
            .event,
        form(9)
    );
    log.verify(Position::ZERO).expect("verify");
}

#[test]
fn a_lost_index_tail_is_rebuilt_from_the_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = written(&dir, 6);
    drop((log, db));
    // A file system may lose an index tail written but not yet synced: short, or zero-filled.
    let index = std::fs::read(index_file(&dir)).expect("read");
    std::fs::write(index_file(&dir), &index[..2 * 8]).expect("short");
    let (db, log) = reopen(&dir).expect("reopen");
    for i in 2..=6 {
        assert_eq!(
            log.read_at_with_raw(Position(i))
                .expect("read")
                .expect("event")
                .event,
            form(i)
        );
    }
    drop((log, db));
    let mut zeroed = index.clone();
    zeroed[3 * 8..].fill(0);
    std::fs::write(index_file(&dir), &zeroed).expect("zeroed");
    let (_db, log) = reopen(&dir).expect("reopen");
    assert_eq!(std::fs::read(index_file(&dir)).expect("read"), index);
    log.verify(Position::ZERO).expect("verify");
}

#[test]
fn raw_files_cut_short_refuse_to_open_naming_the_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = written(&dir, 5);
    drop((log, db));
    let data = std::fs::read(data_file(&dir)).expect("read");
    std::fs::write(data_file(&dir), &data[..data.len() - 10]).expect("cut");
    let err = reopen(&dir).expect_err("refused");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(5)),
        "{err:?}"
    );
}

#[test]
fn a_flipped_raw_byte_is_named_by_its_position_on_read_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = written(&dir, 5);
    drop((log, db));
    let mut data = std::fs::read(data_file(&dir)).expect("read");
    let second = raw_of(2).len() + 44;
    data[second + 44 + 20] ^= 0x01;
    std::fs::write(data_file(&dir), &data).expect("flip");
    let (_db, log) = reopen(&dir).expect("the record headers still hold");
    let err = log
        .read_at_with_raw(Position(3))
        .expect_err("changed bytes");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(3)),
        "{err:?}"
    );
    let err = log.verify(Position::ZERO).expect_err("verify");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(3)),
        "{err:?}"
    );
    assert_eq!(
        log.read_at_with_raw(Position(4))
            .expect("read")
            .expect("event")
            .event,
        form(4),
        "the other records are unaffected"
    );
}

#[test]
fn verbatim_appends_carry_raw_submissions_to_the_same_head_and_refuse_changed_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_db, log) = written(&dir, 6);
    let entries: Vec<VerbatimEntry> = log
        .chain_from(Position::ZERO)
        .expect("chain")
        .map(|e| {
            let e = e.expect("entry");
            let event = e.decode().expect("decode");
            let raw = event
                .event
                .form_record()
                .map(|f| log.raw_bytes(e.position, f).expect("raw"));
            VerbatimEntry {
                position: e.position,
                envelope: e.envelope.to_vec(),
                raw,
            }
        })
        .collect();

    let copy_dir = tempfile::tempdir().expect("tempdir");
    let (_copy_db, copy) = open(&copy_dir);
    copy.store_raw_in(&raw_dir(&copy_dir), true)
        .expect("raw files");
    let mut changed = entries.clone();
    if let Some(raw) = changed[3].raw.as_mut() {
        raw[10] ^= 1;
    }
    let err = copy.append_verbatim(&changed).expect_err("changed raw");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(4)),
        "{err:?}"
    );
    let mut missing = entries.clone();
    missing[2].raw = None;
    let err = copy.append_verbatim(&missing).expect_err("missing raw");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(3)),
        "{err:?}"
    );
    assert_eq!(copy.written_head(), Position::ZERO, "nothing written");

    let head = copy.append_verbatim(&entries).expect("import");
    assert_eq!(head, log.head_hash());
    copy.flush_blocking().expect("flush");
    assert_eq!(
        copy.verify(Position::ZERO).expect("verify").head_hash,
        head.hash
    );
    assert_eq!(
        std::fs::read(data_file(&copy_dir)).expect("copy"),
        std::fs::read(data_file(&dir)).expect("original"),
        "the same records, in the same order"
    );
}

#[test]
fn a_log_without_raw_files_keeps_raw_bytes_inline_and_both_formats_read_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (_db, log) = open(&dir);
        log.write(req(vec![form(1)])).expect("write");
        log.flush_blocking().expect("flush");
        let event = log.read_at(Position(1)).expect("read").expect("event");
        assert_eq!(event.event, form(1), "inline: the bytes are in the event");
    }
    let (db, log) = reopen(&dir).expect("reopen with raw files");
    log.write(req(vec![form(2)])).expect("write");
    log.flush_blocking().expect("flush");
    let tree = db.open_tree("log/demo").expect("tree");
    let formats: Vec<u8> = (1..=2u64)
        .map(|p| tree.get(p.to_be_bytes()).expect("get").expect("entry")[0])
        .collect();
    assert_eq!(formats, vec![ENVELOPE_FORMAT, DETACHED_FORMAT]);
    for i in 1..=2 {
        assert_eq!(
            log.read_at_with_raw(Position(i))
                .expect("read")
                .expect("event")
                .event,
            form(i)
        );
    }
    log.verify(Position::ZERO).expect("verify");
}
