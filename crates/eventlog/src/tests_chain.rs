//! Tests of the hash chain: linking across writes, groups and reopen, verification from a
//! position, legacy (unchained) entries, verbatim appends, and the acknowledged-head file.

use domain::{CommandId, Event, Position, Timestamp, UserCreatedV1, UserId};

use crate::chain::{chain_hash, read_head_file, Hash, GENESIS};
use crate::envelope::encode_into;
use crate::tests::{domain, open, open_db};
use crate::{decode_header, AppendRequest, EventStore, Expected, LogError, VerbatimEntry};

fn user(i: u64) -> Event {
    Event::UserCreatedV1(UserCreatedV1 {
        user_id: UserId::new(format!("u-{i}")),
        // Long enough, for some, to be stored compressed.
        username: "x".repeat(usize::try_from(i % 5).unwrap_or(0) * 100),
    })
}

fn req(expected: Expected, events: Vec<Event>) -> AppendRequest {
    AppendRequest {
        expected,
        idempotency_key: None,
        command_id: CommandId::new("cmd"),
        recorded_at: Timestamp(1),
        events,
    }
}

/// The chain recomputed from the raw tree: every entry's hash, and each stored previous hash
/// checked against it.
fn recompute(db: &sled::Db) -> Vec<Hash> {
    let tree = db.open_tree("log/demo").expect("tree");
    let mut prev = GENESIS;
    let mut hashes = Vec::new();
    for (n, item) in (1u64..).zip(tree.range(..[0xFFu8])) {
        let (key, value) = item.expect("read");
        assert_eq!(&key[..], &n.to_be_bytes()[..], "gapless keys");
        if let Some(stored) = decode_header(&value).expect("header").prev {
            assert_eq!(stored, &prev, "entry {n} stores the previous hash");
        }
        prev = chain_hash(&prev, Position(n), &value);
        hashes.push(prev);
    }
    hashes
}

/// Rewrites entry `position` through `change`, then gives it a matching crc32, so that only the
/// chain can notice.
fn rewrite(db: &sled::Db, position: u64, change: impl FnOnce(&mut Vec<u8>)) {
    let tree = db.open_tree("log/demo").expect("tree");
    let key = position.to_be_bytes();
    let mut value = tree.get(key).expect("get").expect("present").to_vec();
    change(&mut value);
    let crc = crc32fast::hash(&value[5..]);
    value[1..5].copy_from_slice(&crc.to_le_bytes());
    tree.insert(key, value).expect("insert");
    db.flush().expect("flush");
}

#[tokio::test]
async fn writes_groups_and_appends_chain_every_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = open(&dir);
    log.write(req(Expected::Any, (1..4).map(user).collect()))
        .expect("write");
    // A group with a refused append in the middle: the chain skips what was not written.
    let outcomes = log
        .write_group([
            req(Expected::Any, (4..6).map(user).collect()),
            req(Expected::Head(Position(1)), vec![user(99)]),
            req(Expected::Any, (6..9).map(user).collect()),
        ])
        .expect("group");
    assert!(matches!(
        outcomes[1],
        Err(LogError::WrongExpectedPosition { .. })
    ));
    // Concurrent appends, group-committed.
    let appends: Vec<_> = (9..15)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append(req(Expected::Any, vec![user(i)])).await })
        })
        .collect();
    for a in appends {
        a.await.expect("task").expect("append");
    }
    let hashes = recompute(&db);
    assert_eq!(hashes.len(), 14);
    let head = log.head_hash();
    assert_eq!(head.position, Position(14));
    assert_eq!(Some(&head.hash), hashes.last());
    let verified = log.verify(Position::ZERO).expect("verify");
    assert_eq!(verified.entries, 14);
    assert_eq!(verified.unchained, 0);
    assert_eq!(verified.head_hash, head.hash);
    for n in 1..=14u64 {
        let expect = hashes[usize::try_from(n - 1).expect("index")];
        assert_eq!(log.hash_at(Position(n)).expect("hash_at"), expect, "{n}");
    }
}

#[test]
fn reopen_restores_the_head_hash_and_the_chain_continues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let (_db, log) = open(&dir);
        log.write(req(Expected::Any, (1..6).map(user).collect()))
            .expect("write");
        log.flush_blocking().expect("flush");
        log.head_hash()
    };
    let (db, log) = open(&dir);
    assert_eq!(log.head_hash(), before);
    log.write(req(Expected::Any, (6..8).map(user).collect()))
        .expect("write");
    let hashes = recompute(&db);
    assert_eq!(Some(&log.head_hash().hash), hashes.last());
    assert_eq!(log.verify(Position::ZERO).expect("verify").entries, 7);
}

#[test]
fn verify_from_a_position_checks_from_there_to_the_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = open(&dir);
    log.write(req(Expected::Any, (1..11).map(user).collect()))
        .expect("write");
    let verified = log.verify(Position(4)).expect("verify");
    assert_eq!((verified.from, verified.entries), (Position(4), 7));
    assert_eq!(verified.head_hash, log.head_hash().hash);
    // Damage before `from` is outside what was asked; damage after it is found.
    rewrite(&db, 2, |v| *v.last_mut().expect("byte") ^= 1);
    assert!(log.verify(Position(4)).is_ok());
    let err = log.verify(Position(1)).expect_err("damaged");
    assert!(
        matches!(&err, LogError::Corrupt { position, reason }
            if *position == Position(3) && reason.contains("hash chain broken")),
        "{err:?}"
    );
}

#[test]
fn a_changed_entry_with_a_fixed_crc_breaks_the_link_of_the_next_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (db, log) = open(&dir);
    log.write(req(Expected::Any, (1..6).map(user).collect()))
        .expect("write");
    // The crc32 is not a seal: anyone can recompute it. The chain is what catches the change.
    rewrite(&db, 3, |v| *v.last_mut().expect("byte") ^= 0x20);
    let err = log.verify(Position::ZERO).expect_err("chain");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(4)),
        "{err:?}"
    );
}

#[test]
fn a_changed_last_entry_is_caught_by_the_acknowledged_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (db, log) = open(&dir);
        log.pin_head_file(dir.path()).expect("pin");
        log.write(req(Expected::Any, (2..7).map(user).collect()))
            .expect("write");
        log.flush_blocking().expect("flush");
        let acked = read_head_file(dir.path(), &domain())
            .expect("read")
            .expect("present");
        assert_eq!(acked, log.head_hash());
        drop(log);
        // A change that still decodes (a letter of the user name), so that opening succeeds.
        rewrite(&db, 5, |v| {
            let at = v.iter().rposition(|b| *b == b'x').expect("a name letter");
            v[at] = b'y';
        });
    }
    let (_db, log) = open(&dir);
    // Nothing after the last entry pins it; the head file does.
    let err = log.pin_head_file(dir.path()).expect_err("head differs");
    assert!(
        matches!(&err, LogError::Corrupt { position, reason }
            if *position == Position(5) && reason.contains("acknowledged head")),
        "{err:?}"
    );
}

#[test]
fn a_lost_tail_is_reported_against_the_acknowledged_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (db, log) = open(&dir);
        log.pin_head_file(dir.path()).expect("pin");
        log.write(req(Expected::Any, (1..6).map(user).collect()))
            .expect("write");
        log.flush_blocking().expect("flush");
        drop(log);
        // What sled's recovery does when it stops at a bad checksum: the later writes vanish.
        let tree = db.open_tree("log/demo").expect("tree");
        for p in [4u64, 5] {
            tree.remove(p.to_be_bytes()).expect("remove");
        }
        db.flush().expect("flush");
    }
    let (_db, log) = open(&dir);
    assert_eq!(log.written_head(), Position(3), "the log alone looks fine");
    let err = log.pin_head_file(dir.path()).expect_err("lost tail");
    assert!(
        matches!(&err, LogError::Corrupt { position, reason }
            if *position == Position(5) && reason.contains("lost tail")),
        "{err:?}"
    );
}

#[test]
fn legacy_entries_are_chained_by_their_bytes_and_pinned_by_the_first_chained_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open_db(&dir);
        let tree = db.open_tree("log/demo").expect("tree");
        let mut buf = Vec::new();
        for n in 1..=3u64 {
            encode_into(
                &mut buf,
                None,
                None,
                Position(n),
                Timestamp(1),
                &CommandId::new("old"),
                &user(n + 2),
            )
            .expect("encode");
            assert!(decode_header(&buf).expect("header").prev.is_none());
            tree.insert(n.to_be_bytes(), buf.as_slice())
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let (db, log) = open(&dir);
    let hashes = recompute(&db);
    assert_eq!(
        log.head_hash().hash,
        hashes[2],
        "head hash of a legacy tail"
    );
    log.write(req(Expected::Any, (4..6).map(user).collect()))
        .expect("write");
    let verified = log.verify(Position::ZERO).expect("verify");
    assert_eq!((verified.entries, verified.unchained), (5, 3));
    assert_eq!(
        log.verify(Position(2))
            .expect("from a legacy entry")
            .entries,
        4
    );
    rewrite(&db, 2, |v| *v.last_mut().expect("byte") ^= 0x20);
    let err = log.verify(Position::ZERO).expect_err("chain");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(4)),
        "a change in a legacy entry shows at the first chained entry: {err:?}"
    );
}

#[test]
fn verbatim_appends_rebuild_the_same_chain_and_refuse_a_changed_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_db, log) = open(&dir);
    log.write(req(Expected::Any, (1..8).map(user).collect()))
        .expect("write");
    let entries: Vec<VerbatimEntry> = log
        .chain_from(Position::ZERO)
        .expect("chain")
        .map(|e| {
            e.map(|e| VerbatimEntry {
                position: e.position,
                envelope: e.envelope.to_vec(),
                raw: None,
            })
        })
        .collect::<Result<_, _>>()
        .expect("read");

    let copy_dir = tempfile::tempdir().expect("tempdir");
    let (_copy_db, copy) = open(&copy_dir);
    let mut tampered = entries.clone();
    let changed = &mut tampered[4].envelope;
    let last = changed.len() - 1;
    changed[last] ^= 1;
    let crc = crc32fast::hash(&changed[5..]);
    changed[1..5].copy_from_slice(&crc.to_le_bytes());
    let err = copy.append_verbatim(&tampered).expect_err("tampered");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(5)
            || *position == Position(6)),
        "{err:?}"
    );
    assert_eq!(copy.written_head(), Position::ZERO, "nothing written");
    let err = copy.append_verbatim(&entries[1..]).expect_err("gap");
    assert!(
        matches!(&err, LogError::Corrupt { position, .. } if *position == Position(2)),
        "{err:?}"
    );
    let head = copy.append_verbatim(&entries).expect("import");
    assert_eq!(head, log.head_hash());
    assert_eq!(copy.verify(Position::ZERO).expect("verify").entries, 7);
}
