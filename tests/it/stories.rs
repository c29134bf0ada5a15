//! The seed page's stories (shared/seeds/000_…: "Case Sharing"), end to end through the facade
//! with real CommCare form XML built by `caseledger::demo::form`.

use caseledger::demo::{form, Block};
use caseledger::domain::{AppId, CaseId, Command, ErrorCode, GroupId, UserId};
use caseledger::{Request, SubmitStatus};

use crate::support::World;

impl World {
    /// The seed page's people and apps: two case-sharing teams, a supervisor in both, Tom in
    /// none, an ANC app and a clinic app sharing a case type, and a non-sharing app.
    pub(crate) fn stories() -> Self {
        let w = World::empty();
        for u in ["u-david", "u-maria", "u-ana", "u-grace", "u-tom", "u-sup"] {
            w.user(u, u);
        }
        w.group(
            "g-team",
            "g-team",
            &["u-david", "u-maria", "u-grace", "u-sup"],
        );
        w.group("g-other", "g-other", &["u-ana", "u-sup"]);
        w.app("app-anc", true, &["pregnancy", "referral"]);
        w.app("app-clinic", true, &["pregnancy"]);
        w.app("app-old", false, &["pregnancy"]);
        w
    }
}

pub(crate) fn register<'a>(case: &'a str, user: &'a str, owner: Option<&'a str>) -> Block<'a> {
    Block {
        case_id: case,
        user,
        date: "2026-03-02T09:00:00+03:00",
        create: Some(("pregnancy", "Monica", owner)),
        update: &[],
        close: false,
    }
}

pub(crate) fn visit<'a>(
    case: &'a str,
    user: &'a str,
    date: &'a str,
    update: &'a [(&'a str, &'a str)],
) -> Block<'a> {
    Block {
        case_id: case,
        user,
        date,
        create: None,
        update,
        close: false,
    }
}

#[test]
fn seed_use_case_1_david_and_maria_share_one_case_list() {
    let w = World::stories();
    assert_eq!(
        w.submit(
            "app-anc",
            form("f1", "u-david", &[register("c1", "u-david", None)])
        )
        .outcome,
        SubmitStatus::Accepted
    );
    assert_eq!(
        w.case("c1").owner_id,
        "g-team",
        "seed + R38: the group owns the case"
    );
    assert_eq!(w.sees("u-maria"), vec!["c1"]);
    w.submit(
        "app-anc",
        form(
            "f2",
            "u-maria",
            &[visit(
                "c1",
                "u-maria",
                "2026-03-03T09:00:00Z",
                &[("anc_visits", "1")],
            )],
        ),
    );
    let c = w.case("c1");
    assert_eq!(
        (c.user_id.as_str(), c.opened_by.as_deref()),
        ("u-maria", Some("u-david")),
        "seed FAQ 2: user_id is the last submitter"
    );
    assert!(w.sees("u-ana").is_empty());
}

#[test]
fn seed_use_case_2_the_clinic_app_shares_the_case_type() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    let o = w.submit(
        "app-clinic",
        form(
            "f2",
            "u-grace",
            &[visit(
                "c1",
                "u-grace",
                "2026-03-04T09:00:00Z",
                &[("clinic_outcome", "admitted")],
            )],
        ),
    );
    assert_eq!(o.outcome, SubmitStatus::Accepted);
    assert_eq!(w.case("c1").properties["clinic_outcome"], "admitted");
    assert_eq!(w.sees("u-david"), vec!["c1"], "David sees the outcome");
}

#[test]
fn seed_errors_a_user_in_no_group_is_rejected_and_the_form_is_kept() {
    let w = World::stories();
    let o = w.submit(
        "app-anc",
        form("f1", "u-tom", &[register("c1", "u-tom", None)]),
    );
    assert_eq!(o.outcome, SubmitStatus::Rejected);
    assert_eq!(o.error.map(|e| e.code), Some(ErrorCode::NoCaseSharingGroup));
    assert!(w
        .engine
        .projections()
        .case(&CaseId::new("c1"))
        .expect("read")
        .is_none());
    let stored = w
        .engine
        .log()
        .read_at_with_raw(o.position)
        .expect("decodes")
        .expect("event");
    match stored.event {
        caseledger::domain::Event::FormRejectedV1(r) => {
            let raw = r.form.raw.bytes().expect("reattached");
            assert!(raw.starts_with(b"<?xml"), "raw bytes kept")
        }
        other => panic!("expected FormRejected, got {other:?}"),
    }
}

#[test]
fn seed_advanced_a_supervisor_in_two_groups_reviews_but_cannot_create() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    let review = w.submit(
        "app-anc",
        form(
            "f2",
            "u-sup",
            &[visit(
                "c1",
                "u-sup",
                "2026-03-05T09:00:00Z",
                &[("reviewed", "yes")],
            )],
        ),
    );
    assert_eq!(review.outcome, SubmitStatus::Accepted);
    let create = w.submit(
        "app-anc",
        form("f3", "u-sup", &[register("c2", "u-sup", None)]),
    );
    assert_eq!(
        create.error.map(|e| e.code),
        Some(ErrorCode::MultipleCaseSharingGroups)
    );
    assert_eq!(
        w.sees("u-sup"),
        vec!["c1"],
        "R44: the union of both groups' cases"
    );
}

#[test]
fn seed_faq_1_a_case_from_before_sharing_keeps_its_owner() {
    let w = World::stories();
    w.submit(
        "app-old",
        form("f1", "u-david", &[register("c-old", "u-david", None)]),
    );
    w.cmd(Command::SetAppCaseSharing {
        app: AppId::new("app-old"),
        on: true,
    });
    w.submit(
        "app-old",
        form(
            "f2",
            "u-david",
            &[visit(
                "c-old",
                "u-david",
                "2026-03-06T09:00:00Z",
                &[("v", "2")],
            )],
        ),
    );
    w.submit(
        "app-old",
        form("f3", "u-david", &[register("c-new", "u-david", None)]),
    );
    assert_eq!(w.case("c-old").owner_id, "u-david");
    assert_eq!(w.case("c-new").owner_id, "g-team");
    assert_eq!(w.sees("u-maria"), vec!["c-new"]);
}

#[test]
fn seed_faq_4_owner_id_set_to_the_user_keeps_a_case_private() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form(
            "f1",
            "u-david",
            &[register("c-private", "u-david", Some("u-david"))],
        ),
    );
    assert_eq!(w.sees("u-david"), vec!["c-private"]);
    assert!(w.sees("u-maria").is_empty());
}

#[test]
fn seed_faq_3_offline_edits_apply_in_received_order() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    w.submit(
        "app-anc",
        form(
            "f2",
            "u-maria",
            &[visit(
                "c1",
                "u-maria",
                "2026-03-04T09:00:00Z",
                &[("risk", "low")],
            )],
        ),
    );
    w.submit(
        "app-anc",
        form(
            "f3",
            "u-david",
            &[visit(
                "c1",
                "u-david",
                "2026-03-03T09:00:00Z",
                &[("risk", "high")],
            )],
        ),
    );
    let c = w.case("c1");
    assert_eq!(c.properties["risk"], "high", "later received wins");
    assert_eq!(
        c.modified_on.map(|t| t.to_string()).as_deref(),
        Some("2026-03-04T09:00:00.000Z")
    );
}

#[test]
fn seed_faq_3_an_update_to_a_closed_case_leaves_it_closed() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    let close = Block {
        case_id: "c1",
        user: "u-maria",
        date: "2026-03-10T09:00:00Z",
        create: None,
        update: &[],
        close: true,
    };
    w.submit("app-anc", form("f2", "u-maria", &[close]));
    w.submit(
        "app-anc",
        form(
            "f3",
            "u-david",
            &[visit(
                "c1",
                "u-david",
                "2026-03-09T09:00:00Z",
                &[("pnc", "done")],
            )],
        ),
    );
    let c = w.case("c1");
    assert!(c.closed);
    assert_eq!(c.properties["pnc"], "done");
    assert!(w.sees("u-david").is_empty());
}

#[test]
fn seed_membership_removal_takes_effect_at_once_r44() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    w.cmd(Command::RemoveMember {
        group: GroupId::new("g-team"),
        user: UserId::new("u-maria"),
    });
    assert!(w.sees("u-maria").is_empty());
    assert_eq!(w.sees("u-david"), vec!["c1"]);
    assert_eq!(
        w.case("c1").owner_id,
        "g-team",
        "R41: owner never rewritten"
    );
}

#[test]
fn r57_archiving_the_closing_form_reopens_the_case_and_unarchive_closes_it_again() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    let close = Block {
        case_id: "c1",
        user: "u-maria",
        date: "2026-03-10T09:00:00Z",
        create: None,
        update: &[("outcome", "delivered")],
        close: true,
    };
    w.submit("app-anc", form("f2", "u-maria", &[close]));
    w.submit(
        "app-anc",
        form(
            "f3",
            "u-david",
            &[visit(
                "c1",
                "u-david",
                "2026-03-11T09:00:00Z",
                &[("pnc", "done")],
            )],
        ),
    );
    assert!(w.case("c1").closed);
    w.cmd(Command::ArchiveForm { form: "f2".into() });
    let c = w.case("c1");
    assert!(
        !c.closed,
        "R57: a case closed only by an archived form reopens"
    );
    assert!(!c.properties.contains_key("outcome"));
    assert_eq!(c.properties["pnc"], "done", "later forms still count");
    assert_eq!(c.xform_ids, vec!["f1".into(), "f3".into()]);
    assert_eq!(w.sees("u-maria"), vec!["c1"]);
    w.cmd(Command::UnarchiveForm { form: "f2".into() });
    let c = w.case("c1");
    assert!(
        c.closed,
        "R57: unarchive replays the form at its original position"
    );
    assert_eq!(c.xform_ids, vec!["f1".into(), "f2".into(), "f3".into()]);
}

#[test]
fn r57_archiving_every_form_of_a_case_deletes_it_and_r50_later_blocks_are_illegal() {
    let w = World::stories();
    w.submit(
        "app-anc",
        form("f1", "u-david", &[register("c1", "u-david", None)]),
    );
    w.cmd(Command::ArchiveForm { form: "f1".into() });
    assert!(w
        .engine
        .projections()
        .case(&CaseId::new("c1"))
        .expect("read")
        .is_none());
    assert!(w.sees("u-david").is_empty());
    let o = w.submit(
        "app-anc",
        form(
            "f2",
            "u-maria",
            &[visit(
                "c1",
                "u-maria",
                "2026-03-11T09:00:00Z",
                &[("x", "1")],
            )],
        ),
    );
    assert_eq!(o.error.map(|e| e.code), Some(ErrorCode::IllegalCaseId));
    let err =
        w.rt.block_on(w.engine.execute(Request::new(Command::ArchiveForm {
            form: "nope".into(),
        })));
    assert!(matches!(
        err,
        Err(caseledger::EngineError::Command(
            caseledger::domain::CommandError::UnknownForm(_)
        ))
    ));
}

#[test]
fn r56_reprocess_recovers_a_form_rejected_for_no_case_sharing_group() {
    let w = World::stories();
    let o = w.submit(
        "app-anc",
        form("f1", "u-tom", &[register("c1", "u-tom", None)]),
    );
    assert_eq!(o.error.map(|e| e.code), Some(ErrorCode::NoCaseSharingGroup));
    w.cmd(Command::AddMember {
        group: GroupId::new("g-team"),
        user: UserId::new("u-tom"),
    });
    let again =
        w.rt.block_on(w.engine.reprocess(&"f1".into()))
            .expect("reprocess");
    assert_eq!(again.outcome, SubmitStatus::Accepted);
    assert_eq!(w.case("c1").owner_id, "g-team");
    let twice = w.rt.block_on(w.engine.reprocess(&"f1".into()));
    assert!(twice.is_err(), "an accepted form is not reprocessed");
}

#[test]
fn r54_an_edit_rebuilds_the_case_in_the_old_versions_place() {
    let w = World::stories();
    let v1 = Block {
        case_id: "c1",
        user: "u-david",
        date: "2026-03-02T09:00:00Z",
        create: Some(("pregnancy", "Monica", None)),
        update: &[("edd", "2026-09-01")],
        close: false,
    };
    w.submit("app-anc", form("f1", "u-david", &[v1]));
    w.submit(
        "app-anc",
        form(
            "f2",
            "u-maria",
            &[visit(
                "c1",
                "u-maria",
                "2026-03-03T09:00:00Z",
                &[("edd", "2026-09-10"), ("bp", "110/70")],
            )],
        ),
    );
    let v2 = Block {
        case_id: "c1",
        user: "u-david",
        date: "2026-03-02T09:00:00Z",
        create: Some(("pregnancy", "Monica A.", None)),
        update: &[("edd", "2026-09-15"), ("gravida", "2")],
        close: false,
    };
    let o = w.submit("app-anc", form("f1", "u-david", &[v2]));
    assert_eq!(o.outcome, SubmitStatus::Edited);
    let c = w.case("c1");
    assert_eq!(c.case_name, "Monica A.");
    assert_eq!(
        c.properties["edd"], "2026-09-10",
        "f2 was received after f1's place, so it still wins"
    );
    assert_eq!(c.properties["gravida"], "2");
    assert_eq!(c.xform_ids, vec!["f1".into(), "f2".into()]);
}

/// A case every story leaves behind, as the data APIs must show it.
pub(crate) struct StoryCase {
    pub id: &'static str,
    pub owner: &'static str,
    pub case_type: &'static str,
    pub closed: bool,
}

/// What [`play_all`] leaves: the cases, and the ids of the forms in force (accepted, not
/// archived), both in the order they were last changed.
pub(crate) struct Played {
    pub cases: Vec<StoryCase>,
    pub forms: Vec<&'static str>,
}

/// The seed page's stories played one after the other in one project space, each with ids of
/// its own (`c-uc1`, `f-uc1-1`, …): the store the data API tests export (issue 10).
pub(crate) fn play_all(w: &World) -> Played {
    let ok = |o: caseledger::SubmitOutcome| assert_eq!(o.outcome, SubmitStatus::Accepted, "{o:?}");
    let refused = |o: caseledger::SubmitOutcome| assert_eq!(o.outcome, SubmitStatus::Rejected);
    // Use case 1: David registers, Maria visits.
    ok(w.submit(
        "app-anc",
        form("f-uc1-1", "u-david", &[register("c-uc1", "u-david", None)]),
    ));
    let v = [("anc_visits", "1")];
    ok(w.submit(
        "app-anc",
        form(
            "f-uc1-2",
            "u-maria",
            &[visit("c-uc1", "u-maria", "2026-03-03T09:00:00Z", &v)],
        ),
    ));
    // Use case 2: the clinic app shares the case type.
    ok(w.submit(
        "app-anc",
        form("f-uc2-1", "u-david", &[register("c-uc2", "u-david", None)]),
    ));
    let v = [("clinic_outcome", "admitted")];
    ok(w.submit(
        "app-clinic",
        form(
            "f-uc2-2",
            "u-grace",
            &[visit("c-uc2", "u-grace", "2026-03-04T09:00:00Z", &v)],
        ),
    ));
    // Errors: Tom is in no group.
    refused(w.submit(
        "app-anc",
        form("f-err-1", "u-tom", &[register("c-err", "u-tom", None)]),
    ));
    // Advanced: the supervisor reviews but cannot create.
    ok(w.submit(
        "app-anc",
        form("f-adv-1", "u-david", &[register("c-adv", "u-david", None)]),
    ));
    let v = [("reviewed", "yes")];
    ok(w.submit(
        "app-anc",
        form(
            "f-adv-2",
            "u-sup",
            &[visit("c-adv", "u-sup", "2026-03-05T09:00:00Z", &v)],
        ),
    ));
    refused(w.submit(
        "app-anc",
        form("f-adv-3", "u-sup", &[register("c-adv2", "u-sup", None)]),
    ));
    // FAQ 4: owner_id set to the user keeps a case private.
    ok(w.submit(
        "app-anc",
        form(
            "f-faq4-1",
            "u-david",
            &[register("c-private", "u-david", Some("u-david"))],
        ),
    ));
    // FAQ 3: an update to a closed case leaves it closed.
    ok(w.submit(
        "app-anc",
        form(
            "f-close-1",
            "u-david",
            &[register("c-closed", "u-david", None)],
        ),
    ));
    let close = Block {
        case_id: "c-closed",
        user: "u-maria",
        date: "2026-03-10T09:00:00Z",
        create: None,
        update: &[],
        close: true,
    };
    ok(w.submit("app-anc", form("f-close-2", "u-maria", &[close])));
    let v = [("pnc", "done")];
    ok(w.submit(
        "app-anc",
        form(
            "f-close-3",
            "u-david",
            &[visit("c-closed", "u-david", "2026-03-09T09:00:00Z", &v)],
        ),
    ));
    // R57: archiving the closing form reopens the case.
    ok(w.submit(
        "app-anc",
        form(
            "f-arch-1",
            "u-david",
            &[register("c-arch", "u-david", None)],
        ),
    ));
    let close = Block {
        case_id: "c-arch",
        user: "u-maria",
        date: "2026-03-10T09:00:00Z",
        create: None,
        update: &[],
        close: true,
    };
    ok(w.submit("app-anc", form("f-arch-2", "u-maria", &[close])));
    w.cmd(Command::ArchiveForm {
        form: "f-arch-2".into(),
    });
    // FAQ 1: a case from before sharing keeps its owner.
    ok(w.submit(
        "app-old",
        form("f-faq1-1", "u-david", &[register("c-old", "u-david", None)]),
    ));
    w.cmd(Command::SetAppCaseSharing {
        app: AppId::new("app-old"),
        on: true,
    });
    let v = [("v", "2")];
    ok(w.submit(
        "app-old",
        form(
            "f-faq1-2",
            "u-david",
            &[visit("c-old", "u-david", "2026-03-06T09:00:00Z", &v)],
        ),
    ));
    ok(w.submit(
        "app-old",
        form("f-faq1-3", "u-david", &[register("c-new", "u-david", None)]),
    ));
    let case = |id, owner, closed| StoryCase {
        id,
        owner,
        case_type: "pregnancy",
        closed,
    };
    Played {
        cases: vec![
            case("c-uc1", "g-team", false),
            case("c-uc2", "g-team", false),
            case("c-adv", "g-team", false),
            case("c-private", "u-david", false),
            case("c-closed", "g-team", true),
            case("c-arch", "g-team", false),
            case("c-old", "u-david", false),
            case("c-new", "g-team", false),
        ],
        forms: vec![
            "f-uc1-1",
            "f-uc1-2",
            "f-uc2-1",
            "f-uc2-2",
            "f-adv-1",
            "f-adv-2",
            "f-faq4-1",
            "f-close-1",
            "f-close-2",
            "f-close-3",
            "f-arch-1",
            "f-faq1-1",
            "f-faq1-2",
            "f-faq1-3",
        ],
    }
}
