//! Crash test (I5): a child process appends durably (through `append` and through `write` +
//! `wait_durable`) and prints each acknowledged position; the parent SIGKILLs it mid-append,
//! reopens the log and checks that nothing acknowledged is lost.
//!
//! `harness = false`: `main` is the parent unless `EVENTLOG_CRASH_CHILD_DIR` is set, in which case
//! it is the child writing to that directory (the shape of sled's `test_crash_recovery.rs`).
//! After every kill the parent checks: every acknowledged position is at or below the recovered
//! head, positions are gapless from 1, and every stored envelope decodes with a valid crc.
//! This covers a process crash, where the OS page cache survives; power loss is not simulated.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use domain::{
    Actions, BlockApplied, CaseId, CommandId, Create, DomainName, Event, FormAcceptedV1, FormId,
    FormRecord, Position, Timestamp,
};
use eventlog::{decode_envelope, AppendRequest, EventStore, Expected, LogConfig, SledLog};

const CHILD_ENV: &str = "EVENTLOG_CRASH_CHILD_DIR";
const WRITERS: u64 = 8;

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(Path::new(&dir)),
        None => parent(),
    }
}

fn domain() -> DomainName {
    DomainName::new("crash")
}

fn form(writer: u64, n: u64) -> Event {
    let case_id = format!("case-{writer}-{n}");
    let raw = format!(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/crash\">\
         <n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{case_id}\">\
         <n0:create><n0:case_name>{}</n0:case_name><n0:case_type>pregnancy</n0:case_type>\
         </n0:create></n0:case></data>",
        "x".repeat(1000)
    );
    Event::FormAcceptedV1(FormAcceptedV1 {
        form: FormRecord {
            form_id: FormId::new(format!("form-{writer}-{n}")),
            xmlns: "http://openrosa.org/formdesigner/crash".into(),
            app_id: None,
            user_id: Some("u-david".into()),
            content_hash: [0; 32],
            raw: raw.into_bytes().into(),
        },
        blocks: vec![BlockApplied {
            case_id: CaseId::new(case_id),
            date: Timestamp(0),
            user: "u-david".into(),
            actions: Actions {
                create: Some(Create::default()),
                ..Actions::default()
            },
        }],
    })
}

/// Opens sled, retrying while the parent's just-dropped `Db` still holds the file lock (sled
/// 0.34.7 lets go of its file a little after the last handle is dropped).
fn open_sled(dir: &Path) -> sled::Db {
    let mut attempts = 0;
    loop {
        match sled::open(dir) {
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                attempts += 1;
                assert!(attempts < 500, "sled kept its lock for 5 s: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            db => return db.expect("open sled"),
        }
    }
}

/// Appends forever from several tasks, printing each acknowledged last position.
fn child(dir: &Path) {
    let db = open_sled(dir);
    let log = SledLog::open(&db, &domain(), LogConfig::default()).expect("child: open log");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("child: runtime");
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for n in 0u64.. {
                    let events = (0..1 + n % 3).map(|i| form(writer, n * 3 + i)).collect();
                    let request = AppendRequest {
                        expected: Expected::Any,
                        idempotency_key: Some(format!("{writer}-{n}-{}", std::process::id())),
                        command_id: CommandId::new(format!("{writer}-{n}")),
                        recorded_at: Timestamp(0),
                        events,
                    };
                    // Half the writers take the engine's path (sync write, then group-committed
                    // wait), half the group-committed `append`.
                    let outcome = if writer % 2 == 0 {
                        let outcome = log.write(request).expect("child: write");
                        log.wait_durable(outcome.last())
                            .await
                            .expect("child: wait_durable");
                        outcome
                    } else {
                        log.append(request).await.expect("child: append")
                    };
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{}", outcome.last().0).expect("child: stdout");
                    out.flush().expect("child: stdout");
                }
            }));
        }
        for task in tasks {
            task.await.expect("child: task");
        }
    });
}

fn parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut previous_head = 0;
    // Kill after varying numbers of acknowledgements, including right after the first.
    for (round, kill_after) in [1usize, 50, 200, 500, 1000, 37].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut acked = Vec::new();
        let mut killed = false;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).expect("read child stdout") == 0 {
                break;
            }
            // A line cut short by the kill was never fully acknowledged.
            let Some(number) = line.strip_suffix('\n') else {
                break;
            };
            acked.push(number.parse::<u64>().expect("a position"));
            if !killed && acked.len() >= kill_after {
                child.kill().expect("SIGKILL child");
                killed = true;
            }
        }
        let status = child.wait().expect("wait child");
        assert!(killed, "round {round}: child exited by itself: {status}");

        let max_acked = acked.iter().copied().max().unwrap_or(0);
        let head = check_log(dir.path());
        assert!(
            head >= max_acked,
            "round {round}: acknowledged {max_acked} but recovered head is {head}"
        );
        assert!(
            head >= previous_head,
            "round {round}: head went back from {previous_head} to {head}"
        );
        let mut out = std::io::stderr().lock();
        writeln!(
            out,
            "crash round {round}: killed after {} acks, max acked {max_acked}, recovered head {head}",
            acked.len()
        )
        .expect("stderr");
        previous_head = head;
    }
    writeln!(std::io::stderr().lock(), "crash: ok").expect("stderr");
}

/// Reopens the log and checks every stored event; returns the head.
fn check_log(dir: &Path) -> u64 {
    let db = open_sled(dir);
    let log = SledLog::open(&db, &domain(), LogConfig::default()).expect("reopen log");
    let head = log.written_head();
    assert_eq!(head, log.durable_head());

    // Through the log: gapless, crc-checked, position matches key.
    let mut expect = 1;
    for event in log.iter_from(Position::ZERO) {
        let event = event.expect("every event verifies");
        assert_eq!(event.position, Position(expect));
        expect += 1;
    }
    assert_eq!(expect - 1, head.0, "iteration reaches the head");

    // Straight from the tree, as an audit tool would: every event key decodes with a valid crc.
    let tree = db.open_tree("log/crash").expect("tree");
    let mut expect = 1;
    for item in tree.range(..[0xFFu8]) {
        let (key, value) = item.expect("sled read");
        let position = u64::from_be_bytes(key.as_ref().try_into().expect("8-byte key"));
        assert_eq!(position, expect, "gapless keys");
        let event = decode_envelope(&value).expect("envelope decodes");
        assert_eq!(event.position, Position(position));
        expect += 1;
    }
    assert_eq!(expect - 1, head.0);
    head.0
}
