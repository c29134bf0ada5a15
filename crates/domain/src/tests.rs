//! Given/when/then tests of `decide` and `apply_block` over an in-memory state, each named by
//! behaviour and citing the rule it checks.

use std::collections::HashMap;

use crate::*;

/// An in-memory [`State`]: the fold of every event decided so far.
#[derive(Default)]
struct Memory {
    dir: Directory,
    cases: HashMap<CaseId, Case>,
    forms: HashMap<FormId, FormStatus>,
    diagnostics: Vec<Diagnostic>,
    position: u64,
}

impl State for Memory {
    fn directory(&self) -> &Directory {
        &self.dir
    }
    fn case(&self, id: &CaseId) -> Option<Case> {
        self.cases.get(id).cloned()
    }
    fn form(&self, id: &FormId) -> Option<FormStatus> {
        self.forms.get(id).cloned()
    }
    fn is_deleted(&self, _id: &CaseId) -> bool {
        false
    }
    // These tests do not edit forms; the projections' State folds edits (tests/it).
    fn case_before_form(&self, id: &CaseId, _form: &FormId) -> Option<Case> {
        self.cases.get(id).cloned()
    }
    fn original_received_at(&self, _form: &FormId) -> Option<Timestamp> {
        None
    }
}

impl Memory {
    fn given(commands: &[Command]) -> Self {
        let mut m = Memory::default();
        for c in commands {
            m.when(c).expect("setup command");
        }
        m
    }

    fn when(&mut self, command: &Command) -> Result<Vec<Event>, CommandError> {
        let events = decide(self, command, Timestamp(1_000))?;
        for e in &events {
            self.position += 1;
            match e {
                Event::FormAcceptedV1(f) => {
                    for b in &f.blocks {
                        let c = apply_block(self.cases.remove(&b.case_id), b, &f.form.form_id);
                        self.cases.insert(b.case_id.clone(), c);
                    }
                    self.forms.insert(
                        f.form.form_id.clone(),
                        FormStatus {
                            accepted: true,
                            xmlns: f.form.xmlns.clone(),
                            content_hash: f.form.content_hash,
                            position: Position(self.position),
                            archived: false,
                        },
                    );
                }
                Event::FormRejectedV1(f) => {
                    self.forms.insert(
                        f.form.form_id.clone(),
                        FormStatus {
                            accepted: false,
                            xmlns: f.form.xmlns.clone(),
                            content_hash: f.form.content_hash,
                            position: Position(self.position),
                            archived: false,
                        },
                    );
                }
                Event::DiagnosticRaisedV1(d) => self.diagnostics.push(d.diagnostic.clone()),
                other => self.dir.apply(other),
            }
        }
        Ok(events)
    }

    fn has_diag(&self, code: DiagnosticCode, subject: &str) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.code == code && d.subject == subject)
    }
}

fn user(id: &str) -> Command {
    Command::CreateUser {
        id: UserId::new(id),
        username: id.into(),
    }
}
fn group(id: &str, sharing: bool) -> Command {
    Command::CreateGroup {
        id: GroupId::new(id),
        name: id.into(),
        case_sharing: sharing,
    }
}
fn member(g: &str, u: &str) -> Command {
    Command::AddMember {
        group: GroupId::new(g),
        user: UserId::new(u),
    }
}
fn app(id: &str, sharing: bool) -> Command {
    Command::CreateApp {
        id: AppId::new(id),
        name: id.into(),
        case_sharing: sharing,
        case_types: vec!["pregnancy".into()],
    }
}

fn block(case: &str, date: i64, user: &str, actions: Actions) -> CaseBlock {
    CaseBlock {
        case_id: CaseId::new(case),
        date_modified: Some(Timestamp(date)),
        user_id: Some(user.into()),
        actions,
    }
}
fn create(owner: Option<&str>) -> Actions {
    Actions {
        create: Some(Create {
            case_type: "pregnancy".into(),
            case_name: "Monica".into(),
            owner_id: owner.map(str::to_owned),
            ..Create::default()
        }),
        ..Actions::default()
    }
}
fn update(pairs: &[(&str, &str)]) -> Actions {
    Actions {
        update: pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Actions::default()
    }
}
fn close() -> Actions {
    Actions {
        close: true,
        ..Actions::default()
    }
}

fn submit(id: &str, user: &str, app: &str, blocks: Vec<CaseBlock>) -> Command {
    submit_with(id, user, app, blocks, Vec::new())
}
fn submit_with(
    id: &str,
    user: &str,
    app: &str,
    blocks: Vec<CaseBlock>,
    problems: Vec<Problem>,
) -> Command {
    let raw = format!("<data>{id}{}</data>", blocks.len()).into_bytes();
    let mut hash = [0u8; 32];
    for (i, b) in raw.iter().enumerate() {
        hash[i % 32] ^= *b;
    }
    Command::SubmitForm(Box::new(Submission {
        raw,
        content_hash: hash,
        parsed: Ok(ParsedForm {
            instance_id: FormId::new(id),
            xmlns: "http://openrosa.org/formdesigner/X".into(),
            user_id: Some(user.into()),
            username: None,
            time_end: None,
            device_report: false,
            blocks,
            problems,
        }),
        app: Some(AppId::new(app)),
        attachments: Vec::new(),
        last_sync_token: None,
    }))
}

fn outcome(events: &[Event]) -> Result<(), ErrorCode> {
    match events.first() {
        Some(Event::FormRejectedV1(r)) => Err(r.error.code),
        _ => Ok(()),
    }
}

fn team() -> Memory {
    Memory::given(&[
        user("u-david"),
        user("u-maria"),
        user("u-sup"),
        user("u-tom"),
        group("g-team", true),
        group("g-other", true),
        member("g-team", "u-david"),
        member("g-team", "u-maria"),
        member("g-team", "u-sup"),
        member("g-other", "u-sup"),
        app("app-anc", true),
        app("app-old", false),
    ])
}

#[test]
fn r38_create_without_owner_in_sharing_app_goes_to_the_users_group() {
    let mut m = team();
    let ev = m
        .when(&submit(
            "f1",
            "u-david",
            "app-anc",
            vec![block("c1", 10, "u-david", create(None))],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Ok(()));
    assert_eq!(m.cases[&CaseId::new("c1")].owner_id, "g-team");
}

#[test]
fn r38_user_in_no_group_is_rejected_and_flagged_r59_r66() {
    let mut m = team();
    let ev = m
        .when(&submit(
            "f1",
            "u-tom",
            "app-anc",
            vec![block("c1", 10, "u-tom", create(None))],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::NoCaseSharingGroup));
    assert!(
        !m.cases.contains_key(&CaseId::new("c1")),
        "R49: nothing applied"
    );
    assert!(m.has_diag(DiagnosticCode::UserNotInCaseSharingGroup, "u-tom"));
    assert!(m.has_diag(DiagnosticCode::RejectedSubmission, "f1"));
}

#[test]
fn r38_user_in_two_groups_cannot_create_but_r40_can_update() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-david",
        "app-anc",
        vec![block("c1", 10, "u-david", create(None))],
    ))
    .unwrap();
    let review = m
        .when(&submit(
            "f2",
            "u-sup",
            "app-anc",
            vec![block("c1", 20, "u-sup", update(&[("reviewed", "yes")]))],
        ))
        .unwrap();
    assert_eq!(outcome(&review), Ok(()));
    let created = m
        .when(&submit(
            "f3",
            "u-sup",
            "app-anc",
            vec![block("c2", 30, "u-sup", create(None))],
        ))
        .unwrap();
    assert_eq!(outcome(&created), Err(ErrorCode::MultipleCaseSharingGroups));
    assert!(m.has_diag(DiagnosticCode::UserInMultipleCaseSharingGroups, "u-sup"));
}

#[test]
fn r37_explicit_owner_is_kept_and_r39_non_sharing_app_defaults_to_the_user() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-david",
        "app-anc",
        vec![block("c1", 10, "u-david", create(Some("u-david")))],
    ))
    .unwrap();
    m.when(&submit(
        "f2",
        "u-david",
        "app-old",
        vec![block("c2", 10, "u-david", create(None))],
    ))
    .unwrap();
    assert_eq!(m.cases[&CaseId::new("c1")].owner_id, "u-david");
    assert_eq!(m.cases[&CaseId::new("c2")].owner_id, "u-david");
}

#[test]
fn r41_turning_sharing_on_keeps_existing_owners() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-david",
        "app-old",
        vec![block("c1", 10, "u-david", create(None))],
    ))
    .unwrap();
    m.when(&Command::SetAppCaseSharing {
        app: AppId::new("app-old"),
        on: true,
    })
    .unwrap();
    m.when(&submit(
        "f2",
        "u-david",
        "app-old",
        vec![block("c1", 20, "u-david", update(&[("v", "2")]))],
    ))
    .unwrap();
    assert_eq!(m.cases[&CaseId::new("c1")].owner_id, "u-david");
}

#[test]
fn r22_update_to_closed_case_applies_and_keeps_it_closed_r63() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-david",
        "app-anc",
        vec![block("c1", 10, "u-david", create(None))],
    ))
    .unwrap();
    m.when(&submit(
        "f2",
        "u-maria",
        "app-anc",
        vec![block("c1", 20, "u-maria", close())],
    ))
    .unwrap();
    m.when(&submit(
        "f3",
        "u-david",
        "app-anc",
        vec![block(
            "c1",
            15,
            "u-david",
            update(&[("pnc", "done"), ("closed", "false")]),
        )],
    ))
    .unwrap();
    let c = &m.cases[&CaseId::new("c1")];
    assert!(c.closed, "R19/R22: never reopened");
    assert_eq!(c.closed_by.as_deref(), Some("u-maria"));
    assert_eq!(c.user_id, "u-david");
    assert_eq!(c.properties.get("pnc").map(String::as_str), Some("done"));
    assert!(!c.properties.contains_key("closed"));
    assert!(m.has_diag(DiagnosticCode::ClosedCaseUpdated, "c1"));
}

#[test]
fn r70_later_received_wins_while_modified_on_only_moves_forward_r65() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-david",
        "app-anc",
        vec![block("c1", 10, "u-david", create(None))],
    ))
    .unwrap();
    m.when(&submit(
        "f2",
        "u-maria",
        "app-anc",
        vec![block("c1", 40, "u-maria", update(&[("risk", "low")]))],
    ))
    .unwrap();
    m.when(&submit(
        "f3",
        "u-david",
        "app-anc",
        vec![block("c1", 30, "u-david", update(&[("risk", "high")]))],
    ))
    .unwrap();
    let c = &m.cases[&CaseId::new("c1")];
    assert_eq!(c.properties["risk"], "high");
    assert_eq!(c.modified_on, Some(Timestamp(40)));
    assert_eq!(c.user_id, "u-david");
    assert_eq!(c.xform_ids.len(), 3, "R13");
    assert!(m.has_diag(DiagnosticCode::OutOfOrderEdit, "c1"));
}

#[test]
fn r52_unknown_user_outranks_parse_problems_which_outrank_sharing_errors() {
    let mut m = team();
    let p = |code| Problem {
        code,
        message: "x".into(),
    };
    let ev = m
        .when(&submit_with(
            "f1",
            "u-ghost",
            "app-anc",
            vec![block("c1", 1, "u-ghost", create(None))],
            vec![p(ErrorCode::CaseValueError)],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::UnknownUser));
    let ev = m
        .when(&submit_with(
            "f2",
            "u-tom",
            "app-anc",
            vec![block("c1", 1, "u-tom", create(None))],
            vec![
                p(ErrorCode::InvalidCaseIndex),
                p(ErrorCode::CaseValueError),
                p(ErrorCode::IllegalCaseId),
            ],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::IllegalCaseId));
    let ev = m
        .when(&submit_with(
            "f3",
            "u-tom",
            "app-anc",
            vec![block("c1", 1, "u-tom", create(None))],
            vec![p(ErrorCode::InvalidCaseIndex)],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::NoCaseSharingGroup));
    let ev = m
        .when(&submit_with(
            "f4",
            "u-david",
            "app-anc",
            vec![block("c1", 1, "u-david", create(None))],
            vec![p(ErrorCode::InvalidCaseIndex)],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::InvalidCaseIndex));
}

fn index_to(target: &str) -> Actions {
    Actions {
        index: vec![IndexChange {
            identifier: "parent".into(),
            case_id: target.into(),
            case_type: "pregnancy".into(),
            relationship: Relationship::Child,
        }],
        ..Actions::default()
    }
}

#[test]
fn r29_index_targets_are_checked_after_the_whole_form_r30_not_itself() {
    let mut m = team();
    // The child block comes before its parent's create: fine (R29).
    let mut child = create(None);
    child.index = index_to("mother").index;
    let ev = m
        .when(&submit(
            "f1",
            "u-david",
            "app-anc",
            vec![
                block("kid", 1, "u-david", child),
                block("mother", 1, "u-david", create(None)),
            ],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Ok(()));
    let ev = m
        .when(&submit(
            "f2",
            "u-david",
            "app-anc",
            vec![block("kid", 2, "u-david", index_to("nobody"))],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::InvalidCaseIndex));
    let ev = m
        .when(&submit(
            "f3",
            "u-david",
            "app-anc",
            vec![block("kid", 2, "u-david", index_to("kid"))],
        ))
        .unwrap();
    assert_eq!(outcome(&ev), Err(ErrorCode::InvalidCaseIndex));
    assert_eq!(
        m.cases[&CaseId::new("kid")].indices["parent"].case_id,
        CaseId::new("mother")
    );
}

#[test]
fn r53_identical_resend_is_a_duplicate_and_r56_rejected_forms_are_decided_afresh() {
    let mut m = team();
    let register = submit(
        "f1",
        "u-tom",
        "app-anc",
        vec![block("c1", 1, "u-tom", create(None))],
    );
    assert_eq!(
        outcome(&m.when(&register).unwrap()),
        Err(ErrorCode::NoCaseSharingGroup)
    );
    m.when(&member("g-team", "u-tom")).unwrap();
    assert_eq!(outcome(&m.when(&register).unwrap()), Ok(()), "R56");
    let again = m.when(&register).unwrap();
    assert!(
        matches!(again.first(), Some(Event::FormDuplicateV1(_))),
        "R53"
    );
    assert_eq!(m.cases[&CaseId::new("c1")].xform_ids.len(), 1);
}

#[test]
fn r12_create_blocks_move_ahead_and_update_precedes_close() {
    let mut m = team();
    let ev = m
        .when(&submit(
            "f1",
            "u-david",
            "app-anc",
            vec![
                block("c1", 1, "u-david", close()),
                block("c1", 1, "u-david", update(&[("a", "1")])),
                block("c1", 1, "u-david", create(None)),
            ],
        ))
        .unwrap();
    let Some(Event::FormAcceptedV1(f)) = ev.first() else {
        panic!("accepted expected")
    };
    let keys: Vec<u8> = f.blocks.iter().map(|b| b.actions.order_key()).collect();
    assert_eq!(keys, vec![0, 1, 3]);
    let c = &m.cases[&CaseId::new("c1")];
    assert!(c.closed);
    assert_eq!(c.case_name, "Monica");
}

#[test]
fn r16_update_of_unknown_case_makes_a_stub_owned_by_the_block_user() {
    let mut m = team();
    m.when(&submit(
        "f1",
        "u-maria",
        "app-anc",
        vec![block("c9", 5, "u-maria", update(&[("x", "1")]))],
    ))
    .unwrap();
    let c = &m.cases[&CaseId::new("c9")];
    assert_eq!((c.owner_id.as_str(), c.case_type.as_str()), ("u-maria", ""));
    assert_eq!(c.opened_by.as_deref(), Some("u-maria"));
}

#[test]
fn r60_r61_directory_changes_raise_diagnostics() {
    let mut m = Memory::given(&[user("u1"), group("g1", true), group("g2", true)]);
    m.when(&member("g1", "u1")).unwrap();
    assert!(!m.has_diag(DiagnosticCode::UserInMultipleCaseSharingGroups, "u1"));
    m.when(&member("g2", "u1")).unwrap();
    assert!(m.has_diag(DiagnosticCode::UserInMultipleCaseSharingGroups, "u1"));
    m.when(&Command::SetGroupCaseSharing {
        group: GroupId::new("g1"),
        on: false,
    })
    .unwrap();
    m.when(&app("a1", true)).unwrap();
    assert!(!m.has_diag(DiagnosticCode::CaseSharingAppWithoutGroups, "a1"));
    m.when(&Command::SetGroupCaseSharing {
        group: GroupId::new("g2"),
        on: false,
    })
    .unwrap();
    assert!(m.has_diag(DiagnosticCode::CaseSharingAppWithoutGroups, "a1"));
}

/// The diagnostics a command raised, as (code, subject).
fn raised(events: &[Event]) -> Vec<(DiagnosticCode, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DiagnosticRaisedV1(d) => Some((d.diagnostic.code, d.diagnostic.subject.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn r86_every_change_leaving_a_user_in_several_groups_raises_and_no_ops_raise_nothing() {
    let multi = |u: &str| {
        (
            DiagnosticCode::UserInMultipleCaseSharingGroups,
            u.to_owned(),
        )
    };
    let sharing = |g: &str, on: bool| Command::SetGroupCaseSharing {
        group: GroupId::new(g),
        on,
    };
    let mut m = Memory::given(&[
        user("u1"),
        user("u2"),
        group("g1", true),
        group("g2", true),
        group("g3", true),
        group("gx", false),
    ]);
    for g in ["g1", "g2", "g3"] {
        m.when(&member(g, "u1")).unwrap();
    }
    m.when(&member("g3", "u2")).unwrap();
    // Removed from a group, still in two.
    let removed = Command::RemoveMember {
        group: GroupId::new("g3"),
        user: UserId::new("u1"),
    };
    assert_eq!(raised(&m.when(&removed).unwrap()), vec![multi("u1")]);
    // Added to a group without case sharing while in two.
    assert_eq!(
        raised(&m.when(&member("gx", "u1")).unwrap()),
        vec![multi("u1")]
    );
    m.when(&member("g3", "u1")).unwrap();
    // Sharing turned off, still in two; u2 (in one group, then none) raises nothing.
    assert_eq!(
        raised(&m.when(&sharing("g3", false)).unwrap()),
        vec![multi("u1")]
    );
    // No-ops: nothing recorded, nothing raised.
    assert!(m.when(&sharing("g3", false)).unwrap().is_empty());
    assert!(m.when(&sharing("g1", true)).unwrap().is_empty());
    assert!(m.when(&member("g1", "u1")).unwrap().is_empty());
    // Left in one group: nothing.
    assert!(raised(&m.when(&sharing("g2", false)).unwrap()).is_empty());
}

#[test]
fn admin_commands_refuse_unknown_and_duplicate_ids() {
    let mut m = team();
    assert_eq!(
        m.when(&user("u-david")).unwrap_err(),
        CommandError::AlreadyExists {
            kind: "user",
            id: "u-david".into()
        }
    );
    assert_eq!(
        m.when(&member("g-nope", "u-david")).unwrap_err(),
        CommandError::UnknownGroup(GroupId::new("g-nope"))
    );
    assert_eq!(
        m.when(&member("g-team", "u-nope")).unwrap_err(),
        CommandError::UnknownUser(UserId::new("u-nope"))
    );
    assert!(matches!(
        m.when(&submit("f", "u-david", "app-nope", vec![])),
        Err(CommandError::UnknownApp(_))
    ));
    assert!(
        m.when(&member("g-team", "u-david")).unwrap().is_empty(),
        "already a member: no event"
    );
}

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";

#[test]
fn issue10_password_and_api_keys_fold_into_the_directory_as_hashes() {
    let mut m = Memory::given(&[user("u1")]);
    m.when(&Command::SetPassword {
        user: "u1".into(),
        hash: HASH.into(),
    })
    .unwrap();
    m.when(&Command::CreateApiKey {
        key_id: "k1".into(),
        user: "u1".into(),
        role: Role::Auditor,
        hash: HASH.into(),
    })
    .unwrap();
    let u = m.dir.users.get(&UserId::new("u1")).unwrap();
    assert_eq!(u.password_hash.as_deref(), Some(HASH));
    let k = m.dir.api_keys.get(&ApiKeyId::new("k1")).unwrap();
    assert_eq!((k.role, k.revoked), (Role::Auditor, false));
    let revoked = m
        .when(&Command::RevokeApiKey {
            key_id: "k1".into(),
        })
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert!(m.dir.api_keys.get(&ApiKeyId::new("k1")).unwrap().revoked);
    // Revoking again changes nothing and records nothing.
    let again = m
        .when(&Command::RevokeApiKey {
            key_id: "k1".into(),
        })
        .unwrap();
    assert!(again.is_empty());
}

#[test]
fn issue10_credentials_of_unknown_users_and_keys_are_typed_errors() {
    let mut m = Memory::given(&[user("u1")]);
    let set = Command::SetPassword {
        user: "nobody".into(),
        hash: HASH.into(),
    };
    assert_eq!(
        m.when(&set),
        Err(CommandError::UnknownUser("nobody".into()))
    );
    let key = Command::CreateApiKey {
        key_id: "k1".into(),
        user: "nobody".into(),
        role: Role::Admin,
        hash: HASH.into(),
    };
    assert_eq!(
        m.when(&key),
        Err(CommandError::UnknownUser("nobody".into()))
    );
    let revoke = Command::RevokeApiKey {
        key_id: "k9".into(),
    };
    assert_eq!(
        m.when(&revoke),
        Err(CommandError::UnknownApiKey("k9".into()))
    );
}

#[test]
fn issue10_a_secret_in_clear_is_never_recorded() {
    let mut m = Memory::given(&[user("u1")]);
    for clear in [
        "hunter2",
        "$argon2i$v=19$m=1,t=1,p=1$c2FsdA$aGFzaA",
        "",
        "$argon2id$$$$",
    ] {
        let set = Command::SetPassword {
            user: "u1".into(),
            hash: clear.into(),
        };
        assert!(
            matches!(
                m.when(&set),
                Err(CommandError::Invalid { field: "hash", .. })
            ),
            "{clear:?} accepted"
        );
    }
}

#[test]
fn issue10_the_last_sync_token_is_recorded_with_the_form_whatever_its_outcome() {
    let mut m = Memory::given(&[user("u1"), app("a", false)]);
    let Command::SubmitForm(mut sub) = submit("f1", "nobody", "a", Vec::new()) else {
        unreachable!()
    };
    sub.last_sync_token = Some("7-abc".into());
    let events = m.when(&Command::SubmitForm(sub)).unwrap();
    assert!(matches!(events.first(), Some(Event::FormRejectedV1(_))));
    assert_eq!(
        events.get(1),
        Some(&Event::FormLastSyncTokenV1(FormLastSyncTokenV1 {
            form_id: "f1".into(),
            token: "7-abc".into(),
        }))
    );
}
