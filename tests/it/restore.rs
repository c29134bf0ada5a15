//! Restore payloads (R45–R48) through the facade: the seed page's stories as snapshots of the XML a
//! phone would receive, the footprint rules as a table of small case graphs, and sync tokens.
//!
//! Snapshots live in `tests/data/restore/<name>.xml` with the random part of the restore id and the
//! registration date masked; `UPDATE_EXPECT=1 cargo test --test it restore` rewrites them, and the
//! diff goes in the review. Footprint graphs live in `tests/data/restore/footprint.json`; adding
//! one needs no Rust.

use std::collections::BTreeSet;
use std::path::PathBuf;

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, CaseId, Command, UserId};
use caseledger::restore::{restore, Restore, RestoreError};
use caseledger::{Request, SubmitStatus};
use serde_json::Value;

use crate::support::{self, World};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/restore")
}

/// Replaces what changes from run to run with fixed placeholders: the random part of the
/// restore id (its position stays) and the registration date.
fn mask(xml: &str) -> String {
    let mut out = xml.to_owned();
    if let Some(start) = out.find("<restore_id>") {
        let from = start + "<restore_id>".len();
        if let (Some(dash), Some(end)) = (out[from..].find('-'), out[from..].find("</restore_id>"))
        {
            if dash < end {
                out.replace_range(from + dash + 1..from + end, "RANDOM");
            }
        }
    }
    if let Some(reg) = out.find("<Registration") {
        if let (Some(open), Some(close)) = (out[reg..].find("<date>"), out[reg..].find("</date>")) {
            out.replace_range(reg + open + "<date>".len()..reg + close, "DATE");
        }
    }
    out
}

/// Compares a restore with its snapshot, or rewrites the snapshot under `UPDATE_EXPECT=1`.
fn check(name: &str, restore: &Restore) {
    let path = data_dir().join(format!("{name}.xml"));
    let actual = mask(&restore.xml);
    if std::env::var_os("UPDATE_EXPECT").is_some() {
        std::fs::create_dir_all(data_dir()).expect("create tests/data/restore");
        std::fs::write(&path, &actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_EXPECT=1 to create it",
            path.display()
        )
    });
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the restore at line {}:\n  expected: {}\n  actual:   {}\n\
             full restore:\n{actual}\nrun with UPDATE_EXPECT=1 to accept it",
            path.display(),
            line + 1,
            expected.lines().nth(line).unwrap_or("<end>"),
            actual.lines().nth(line).unwrap_or("<end>"),
        );
    }
}

impl World {
    /// The seed page's people: a Kibera team sharing cases, a Mathare team, a supervisor in both.
    fn seed() -> Self {
        let w = World::empty();
        for (id, name) in [
            ("u-david", "david"),
            ("u-maria", "maria"),
            ("u-ana", "ana"),
            ("u-sup", "supervisor"),
        ] {
            w.user(id, name);
        }
        w.group(
            "g-kibera",
            "Kibera CHW team",
            &["u-david", "u-maria", "u-sup"],
        );
        w.group("g-mathare", "Mathare CHW team", &["u-ana", "u-sup"]);
        w.cmd(Command::CreateApp {
            id: AppId::new("app-anc"),
            name: "ANC".into(),
            case_sharing: true,
            case_types: vec!["pregnancy".into(), "child".into(), "referral".into()],
        });
        w
    }

    /// Submits a form that must be accepted.
    fn accept(&self, app: Option<&str>, xml: Vec<u8>) {
        let o = self.submit_to(app, xml);
        assert_eq!(o.outcome, SubmitStatus::Accepted, "{:?}", o.error);
    }

    fn anc(&self, instance: &str, user: &str, blocks: &[Block<'_>]) {
        self.accept(Some("app-anc"), form(instance, user, blocks));
    }

    fn conformance(&self, scenario: &str, file: &str) {
        let path = support::conformance_dir().join(scenario).join(file);
        self.accept(
            Some("app-anc"),
            std::fs::read(&path).expect("scenario form"),
        );
    }

    fn restore(&self, user: &str, since: Option<&str>) -> Restore {
        restore(&self.engine, user, since).expect("restore")
    }
}

fn ids(r: &Restore) -> Vec<&str> {
    r.cases.iter().map(CaseId::as_str).collect()
}

fn block<'a>(
    case_id: &'a str,
    user: &'a str,
    date: &'a str,
    create: Option<(&'a str, &'a str, Option<&'a str>)>,
    update: &'a [(&'a str, &'a str)],
    close: bool,
) -> Block<'a> {
    Block {
        case_id,
        user,
        date,
        create,
        update,
        close,
    }
}

/// The seed stories' cases: Monica shared by the Kibera team (seed use case 1), a Mathare
/// client with markup in her name, David's private referral (FAQ 4) and a closed case.
fn seed_stories() -> World {
    let w = World::seed();
    w.anc(
        "f-1",
        "u-david",
        &[block(
            "c-monica",
            "u-david",
            "2026-03-02T09:15:22.104+03:00",
            Some(("pregnancy", "Monica", None)),
            &[("edd", "2026-09-01"), ("lmp", "2025-11-25")],
            false,
        )],
    );
    w.anc(
        "f-2",
        "u-maria",
        &[block(
            "c-monica",
            "u-maria",
            "2026-03-03T11:40:05.870+03:00",
            None,
            &[("anc_visits", "1")],
            false,
        )],
    );
    w.anc(
        "f-3",
        "u-ana",
        &[block(
            "c-akinyi",
            "u-ana",
            "2026-03-04T10:00:00+03:00",
            Some(("pregnancy", "Akinyi \"Baby\" <twin> & co", None)),
            &[("village", "Mathare 4A & <B>")],
            false,
        )],
    );
    w.anc(
        "f-4",
        "u-david",
        &[block(
            "c-private",
            "u-david",
            "2026-03-05T09:00:00+03:00",
            Some(("referral", "HIV status", Some("u-david"))),
            &[],
            false,
        )],
    );
    w.anc(
        "f-5",
        "u-david",
        &[block(
            "c-closed",
            "u-david",
            "2026-03-06T09:00:00+03:00",
            Some(("pregnancy", "Wanjiru", None)),
            &[],
            false,
        )],
    );
    w.anc(
        "f-6",
        "u-maria",
        &[block(
            "c-closed",
            "u-maria",
            "2026-03-07T09:00:00+03:00",
            None,
            &[],
            true,
        )],
    );
    w
}

#[test]
fn r46_seed_use_case_1_david_restores_the_shared_case_and_his_private_one() {
    let w = seed_stories();
    let r = w.restore("u-david", None);
    assert_eq!(
        ids(&r),
        ["c-monica", "c-private"],
        "R45: the closed case is not sent"
    );
    assert!(
        r.xml
            .contains(&format!("<restore_id>{}</restore_id>", r.token)),
        "R48: the token is the restore id"
    );
    check("seed-david", &r);
}

#[test]
fn r45_seed_faq_4_maria_gets_the_shared_case_but_not_davids_private_one() {
    let w = seed_stories();
    let r = w.restore("u-maria", None);
    assert_eq!(ids(&r), ["c-monica"]);
    check("seed-maria", &r);
}

#[test]
fn r45_r47_seed_advanced_the_supervisor_restores_the_union_of_both_groups() {
    let w = seed_stories();
    let r = w.restore("u-sup", None);
    assert_eq!(ids(&r), ["c-akinyi", "c-monica"]);
    check("seed-supervisor", &r);
}

#[test]
fn r47_a_user_in_no_group_gets_an_empty_groups_fixture_and_only_own_cases() {
    let w = seed_stories();
    w.user("u-tom", "tom");
    let r = w.restore("u-tom", None);
    assert!(r.cases.is_empty());
    assert!(r
        .xml
        .contains(r#"<fixture id="user-groups" user_id="u-tom"><groups/></fixture>"#));
}

#[test]
fn r45_scenario_16_a_closed_mother_is_sent_with_her_open_children() {
    let w = World::seed();
    w.conformance("16-parent-child-index", "01-register.xml");
    w.conformance("16-parent-child-index", "02-delivery-twins.xml");
    let mother = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";
    w.anc(
        "f-close-mother",
        "u-maria",
        &[block(
            mother,
            "u-maria",
            "2026-03-05T08:00:00+03:00",
            None,
            &[],
            true,
        )],
    );
    let r = w.restore("u-david", None);
    assert_eq!(
        ids(&r),
        [
            mother,
            "5e0c9a7b-1f2d-4c3e-8a9b-0d1e2f3a4b5c",
            "6f1d0b8c-2a3e-4d4f-9b0c-1e2f3a4b5c6d"
        ],
        "R45: a parent of a live case is live even when closed"
    );
    assert!(
        !w.sees("u-david").contains(&mother.to_owned()),
        "R44: the case list itself has no index closure"
    );
    check("parent-child", &r);
}

#[test]
fn r45_scenario_17_an_extension_brings_its_host_from_another_owner_until_the_host_closes() {
    let w = World::seed();
    w.conformance("17-extension-index", "01-register.xml");
    w.conformance("17-extension-index", "02-referral-ext.xml");
    let host = "3f9b6a52-7c1e-4d2a-9b8e-1c5d2e7f4a10";
    // The pregnancy moves to the clinic; the referral stays with the team.
    w.anc(
        "f-transfer",
        "u-david",
        &[block(
            host,
            "u-david",
            "2026-03-04T09:00:00+03:00",
            None,
            &[("owner_id", "u-clinic")],
            false,
        )],
    );
    let r = w.restore("u-maria", None);
    assert_eq!(
        ids(&r),
        [host, "c-ref-001"],
        "R45: host of a live extension"
    );
    assert_eq!(w.sees("u-maria"), ["c-ref-001"], "R44: no closure");
    check("extension", &r);

    w.anc(
        "f-host-closed",
        "u-david",
        &[block(
            host,
            "u-david",
            "2026-03-05T09:00:00+03:00",
            None,
            &[],
            true,
        )],
    );
    let r = w.restore("u-maria", None);
    assert!(
        r.cases.is_empty(),
        "R45: an owned extension whose host is closed is not live, got {:?}",
        r.cases
    );
}

/// Builds one footprint graph as forms: every case created in one form (indices are checked
/// after all blocks, R29), the closed ones closed in a second.
fn graph_forms(n: usize, graph: &Value) -> (String, Vec<Vec<u8>>, BTreeSet<String>) {
    let list = |k: &str| -> Vec<Value> {
        graph
            .get(k)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let names = |k: &str| -> BTreeSet<String> {
        list(k)
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let pairs = |k: &str| -> Vec<(String, String)> {
        list(k)
            .iter()
            .filter_map(|p| {
                Some((
                    p.get(0)?.as_str()?.to_owned(),
                    p.get(1)?.as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let user = format!("u-g{n}");
    let owned = names("owned");
    let closed = names("closed");
    let children = pairs("children");
    let extensions = pairs("extensions");
    let mut nodes = names("cases");
    nodes.extend(owned.iter().cloned());
    nodes.extend(closed.iter().cloned());
    for (a, b) in children.iter().chain(extensions.iter()) {
        nodes.insert(a.clone());
        nodes.insert(b.clone());
    }
    let id = |node: &str| format!("g{n}-{node}");
    let case_open = |node: &str| {
        format!(
            "<n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{}\" \
             date_modified=\"2026-03-02T09:00:00Z\" user_id=\"{user}\">",
            id(node)
        )
    };
    let wrap = |instance: String, body: String| {
        format!(
            "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/RESTORE-GRAPH\">\n\
             {body}<n1:meta xmlns:n1=\"http://openrosa.org/jr/xforms\"><n1:userID>{user}</n1:userID>\
             <n1:instanceID>{instance}</n1:instanceID></n1:meta></data>\n"
        )
        .into_bytes()
    };
    let mut body = String::new();
    for node in &nodes {
        let owner = if owned.contains(node) {
            user.as_str()
        } else {
            "u-nobody"
        };
        body.push_str(&case_open(node));
        body.push_str(&format!(
            "<n0:create><n0:case_name>{node}</n0:case_name><n0:case_type>node</n0:case_type>\
             <n0:owner_id>{owner}</n0:owner_id></n0:create>"
        ));
        let mut index = String::new();
        for (sub, target) in &children {
            if sub == node {
                index.push_str(&format!(
                    "<n0:p_{target} case_type=\"node\">{}</n0:p_{target}>",
                    id(target)
                ));
            }
        }
        for (sub, target) in &extensions {
            if sub == node {
                index.push_str(&format!(
                    "<n0:h_{target} case_type=\"node\" relationship=\"extension\">{}</n0:h_{target}>",
                    id(target)
                ));
            }
        }
        if !index.is_empty() {
            body.push_str(&format!("<n0:index>{index}</n0:index>"));
        }
        body.push_str("</n0:case>\n");
    }
    let mut forms = vec![wrap(format!("g{n}-create"), body)];
    if !closed.is_empty() {
        let mut body = String::new();
        for node in &closed {
            body.push_str(&case_open(node));
            body.push_str("<n0:close/></n0:case>\n");
        }
        forms.push(wrap(format!("g{n}-close"), body));
    }
    let live = names("live").iter().map(|node| id(node)).collect();
    (user, forms, live)
}

#[test]
fn r45_footprint_graphs_follow_hq_livequery() {
    // The shapes follow the semantics of HQ's relationship corpus
    // (casexml/apps/phone/tests/data/case_relationship_tests.json), in caseledger's own words.
    let text = std::fs::read_to_string(data_dir().join("footprint.json")).expect("footprint.json");
    let graphs: Vec<Value> = serde_json::from_str(&text).expect("footprint.json is JSON");
    let w = World::empty();
    w.user("u-nobody", "nobody");
    let mut failures = Vec::new();
    for (n, graph) in graphs.iter().enumerate() {
        let name = graph.get("name").and_then(Value::as_str).unwrap_or("?");
        let (user, forms, want) = graph_forms(n, graph);
        w.user(&user, &user);
        for xml in forms {
            w.accept(None, xml);
        }
        let got: BTreeSet<String> = w
            .restore(&user, None)
            .cases
            .into_iter()
            .map(|c| c.0)
            .collect();
        if got != want {
            failures.push(format!("{name}: live {got:?}, expected {want:?}"));
        }
    }
    assert!(failures.is_empty(), "R45:\n{}", failures.join("\n"));
}

fn position(token: &str) -> u64 {
    token
        .split_once('-')
        .and_then(|(p, _)| p.parse().ok())
        .expect("token position")
}

#[test]
fn r48_an_incremental_restore_sends_only_the_case_that_changed() {
    let w = seed_stories();
    let first = w.restore("u-david", None);
    let unchanged = w.restore("u-david", Some(&first.token));
    assert!(unchanged.cases.is_empty(), "{:?}", unchanged.cases);
    assert!(
        unchanged.xml.contains(r#"<group id="g-kibera">"#),
        "R47: the fixture is always sent in full"
    );

    w.anc(
        "f-7",
        "u-maria",
        &[block(
            "c-monica",
            "u-maria",
            "2026-03-08T09:00:00+03:00",
            None,
            &[("anc_visits", "2")],
            false,
        )],
    );
    let next = w.restore("u-david", Some(&first.token));
    assert_eq!(ids(&next), ["c-monica"]);
    assert_eq!(next.xml.matches("<case ").count(), 1);
    assert!(next.xml.contains("<anc_visits>2</anc_visits>"));
    assert!(position(&next.token) > position(&first.token));
    assert!(w.restore("u-david", Some(&next.token)).cases.is_empty());
    check("incremental", &next);
}

#[test]
fn r48_every_restore_gets_a_fresh_token() {
    let w = seed_stories();
    let a = w.restore("u-david", None);
    let b = w.restore("u-david", None);
    assert_ne!(a.token, b.token);
    assert_eq!(
        position(&a.token),
        position(&b.token),
        "nothing happened in between"
    );
    assert_eq!(mask(&a.xml), mask(&b.xml));
}

#[test]
fn r48_a_case_closed_by_a_teammate_is_sent_closed_so_the_phone_can_drop_it() {
    let w = seed_stories();
    let first = w.restore("u-david", None);
    w.anc(
        "f-7",
        "u-maria",
        &[block(
            "c-monica",
            "u-maria",
            "2026-03-20T09:00:00+03:00",
            None,
            &[],
            true,
        )],
    );
    let next = w.restore("u-david", Some(&first.token));
    assert_eq!(ids(&next), ["c-monica"]);
    assert!(next.xml.contains("<close/>"));
    assert!(w
        .restore("u-david", None)
        .cases
        .iter()
        .all(|c| c.as_str() != "c-monica"));
}

#[test]
fn r48_joining_a_group_sends_the_groups_cases_although_they_did_not_change() {
    let w = seed_stories();
    let first = w.restore("u-ana", None);
    assert_eq!(ids(&first), ["c-akinyi"]);
    w.add("g-kibera", "u-ana");
    let next = w.restore("u-ana", Some(&first.token));
    assert_eq!(ids(&next), ["c-akinyi", "c-monica"]);
}

/// A form that only creates `child`, indexed to `parent`; the parent itself is not touched.
fn child_form(instance: &str, user: &str, child: &str, parent: &str) -> Vec<u8> {
    format!(
        "<?xml version='1.0' ?><data xmlns=\"http://openrosa.org/formdesigner/REGISTER-CHILD\">\n\
         <n0:case xmlns:n0=\"http://commcarehq.org/case/transaction/v2\" case_id=\"{child}\" \
         date_modified=\"2026-03-09T09:00:00+03:00\" user_id=\"{user}\">\
         <n0:create><n0:case_name>Baby</n0:case_name><n0:case_type>child</n0:case_type></n0:create>\
         <n0:index><n0:parent case_type=\"pregnancy\">{parent}</n0:parent></n0:index></n0:case>\n\
         <n1:meta xmlns:n1=\"http://openrosa.org/jr/xforms\"><n1:userID>{user}</n1:userID>\
         <n1:instanceID>{instance}</n1:instanceID></n1:meta></data>\n"
    )
    .into_bytes()
}

#[test]
fn r45_r48_a_new_child_arrives_with_its_unchanged_parent_from_another_team() {
    let w = seed_stories();
    // Akinyi belongs to the Mathare team; a Kibera CHW registers her baby.
    let first = w.restore("u-david", None);
    assert_eq!(ids(&first), ["c-monica", "c-private"]);
    w.accept(
        Some("app-anc"),
        child_form("f-baby", "u-maria", "c-baby", "c-akinyi"),
    );
    let next = w.restore("u-david", Some(&first.token));
    assert_eq!(
        ids(&next),
        ["c-akinyi", "c-baby"],
        "R45: the parent comes with the child, though only the child changed"
    );
}

#[test]
fn r48_a_token_that_this_store_did_not_issue_is_refused() {
    let w = seed_stories();
    let head = position(&w.restore("u-david", None).token);
    for bad in [
        "".to_owned(),
        "garbage".to_owned(),
        "12".to_owned(),
        "-abc".to_owned(),
        format!("{}-abc", head + 1),
    ] {
        match restore(&w.engine, "u-david", Some(&bad)) {
            Err(RestoreError::BadToken(_)) => {}
            other => panic!(
                "{bad:?}: expected BadToken, got {:?}",
                other.map(|r| r.cases)
            ),
        }
    }
}

#[test]
fn r45_an_unknown_user_is_refused() {
    let w = seed_stories();
    match restore(&w.engine, "u-nobody", None) {
        Err(e @ RestoreError::UnknownUser(_)) => assert!(e.to_string().contains("u-nobody")),
        other => panic!("expected UnknownUser, got {:?}", other.map(|r| r.cases)),
    }
}

#[test]
fn r46_the_payload_escapes_markup_in_case_values() {
    let w = seed_stories();
    let xml = w.restore("u-ana", None).xml;
    assert!(xml.contains("<case_name>Akinyi \"Baby\" &lt;twin&gt; &amp; co</case_name>"));
    assert!(xml.contains("<village>Mathare 4A &amp; &lt;B&gt;</village>"));
}

#[test]
fn r46_registration_date_is_when_the_user_was_created() {
    let (_dir, engine) = support::engine();
    let mut request = Request::new(Command::CreateUser {
        id: UserId::new("u-new"),
        username: "newbie".into(),
    });
    request.received_at =
        Some(caseledger::domain::Timestamp::parse_rfc3339("2026-01-15T23:30:00Z").expect("time"));
    support::rt()
        .block_on(engine.execute(request))
        .expect("create user");
    let r = restore(&engine, "u-new", None).expect("restore");
    assert!(r.xml.contains("<date>2026-01-15</date>"), "{}", r.xml);
}
