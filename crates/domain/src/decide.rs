//! `decide`: a command and the current state in, events (or a [`CommandError`]) out. Pure.
//!
//! For a form submission this is CommCare's server-side processing: duplicate detection (R53,
//! R55, R56), the error precedence of R52, owner defaulting for case sharing (R38), block ordering
//! (R12), a dry run of every block to find diagnostics (§9) and to check index targets after the
//! whole form (R29). An accepted form is recorded with the blocks exactly as they will be applied,
//! so projections never re-decide anything.
//!
//! One file past 600 lines because the submission path is one sequence whose order *is* the rule
//! (R52's precedence): splitting it would hide that order across files.

use std::collections::HashMap;

use crate::{
    apply_block, check_argon2id, ApiKeyCreatedV1, ApiKeyRevokedV1, AppCaseSharingSetV1,
    AppCreatedV1, BlockApplied, Case, CaseId, Command, CommandError, Diagnostic, DiagnosticCode,
    DiagnosticRaisedV1, Directory, ErrorCode, Event, FormAcceptedV1, FormArchiveV1,
    FormAttachmentsV1, FormDuplicateV1, FormEditedV1, FormId, FormLastSyncTokenV1, FormRecord,
    FormRejectedV1, GroupCaseSharingSetV1, GroupCreatedV1, MembershipV1, ParsedForm, Position,
    Rejection, Submission, Timestamp, UserCreatedV1, UserPasswordSetV1, MAX_VALUE_LEN,
};

/// What `decide` knows about a form id that was seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormStatus {
    /// True when the form is in force (accepted); false when it was rejected.
    pub accepted: bool,
    /// Its xmlns.
    pub xmlns: String,
    /// SHA-256 of its bytes.
    pub content_hash: [u8; 32],
    /// Where the version in force (or the rejection) was recorded.
    pub position: Position,
    /// Archived (R57).
    pub archived: bool,
}

/// Read-only view of the state a decision needs. Implemented over projections by `engine`.
pub trait State {
    /// Users, groups, apps.
    fn directory(&self) -> &Directory;
    /// A case as of now, `None` if it does not exist.
    fn case(&self, id: &CaseId) -> Option<Case>;
    /// The latest status of a form id, `None` if never seen.
    fn form(&self, id: &FormId) -> Option<FormStatus>;
    /// True when the case existed and was deleted by an edit or archive (R50 IllegalCaseId).
    fn is_deleted(&self, id: &CaseId) -> bool;
    /// The case as the rebuild of an edit of `form` leaves it just before the form's place in
    /// received order: folded from the live forms received before it, the form itself left out
    /// (R58, R84, R85). `None` when no such form touched it.
    fn case_before_form(&self, id: &CaseId, form: &FormId) -> Option<Case>;
    /// The server received time of the form's first version (R85), `None` if never accepted.
    fn original_received_at(&self, form: &FormId) -> Option<Timestamp>;
}

/// Decides a command. `received_at` is the server received time (R5, R9).
pub fn decide(
    state: &impl State,
    command: &Command,
    received_at: Timestamp,
) -> Result<Vec<Event>, CommandError> {
    let dir = state.directory();
    match command {
        Command::CreateUser { id, username } => {
            check_id("user id", id.as_str())?;
            check_id("username", username)?;
            if dir.users.contains_key(id) {
                return Err(exists("user", id.as_str()));
            }
            Ok(vec![Event::UserCreatedV1(UserCreatedV1 {
                user_id: id.clone(),
                username: username.clone(),
            })])
        }
        Command::CreateGroup {
            id,
            name,
            case_sharing,
        } => {
            check_id("group id", id.as_str())?;
            check_id("group name", name)?;
            if dir.groups.contains_key(id) {
                return Err(exists("group", id.as_str()));
            }
            Ok(vec![Event::GroupCreatedV1(GroupCreatedV1 {
                group_id: id.clone(),
                name: name.clone(),
                case_sharing: *case_sharing,
            })])
        }
        Command::SetGroupCaseSharing { group, on } => {
            let Some(g) = dir.groups.get(group) else {
                return Err(CommandError::UnknownGroup(group.clone()));
            };
            if g.case_sharing == *on {
                // R86: already in the asked state: nothing happened, nothing to record or raise.
                return Ok(Vec::new());
            }
            let event = Event::GroupCaseSharingSetV1(GroupCaseSharingSetV1 {
                group_id: group.clone(),
                case_sharing: *on,
            });
            Ok(with_directory_diagnostics(dir, event))
        }
        Command::AddMember { group, user } | Command::RemoveMember { group, user } => {
            let Some(g) = dir.groups.get(group) else {
                return Err(CommandError::UnknownGroup(group.clone()));
            };
            if !dir.users.contains_key(user) {
                return Err(CommandError::UnknownUser(user.clone()));
            }
            let m = MembershipV1 {
                group_id: group.clone(),
                user_id: user.clone(),
            };
            let adding = matches!(command, Command::AddMember { .. });
            if adding == g.members.contains(user) {
                // Already in (or already out of) the group: nothing happened, nothing to record.
                return Ok(Vec::new());
            }
            let event = if adding {
                Event::MemberAddedV1(m)
            } else {
                Event::MemberRemovedV1(m)
            };
            Ok(with_directory_diagnostics(dir, event))
        }
        Command::CreateApp {
            id,
            name,
            case_sharing,
            case_types,
        } => {
            check_id("app id", id.as_str())?;
            check_id("app name", name)?;
            if dir.apps.contains_key(id) {
                return Err(exists("app", id.as_str()));
            }
            let event = Event::AppCreatedV1(AppCreatedV1 {
                app_id: id.clone(),
                name: name.clone(),
                case_sharing: *case_sharing,
                case_types: case_types.clone(),
            });
            Ok(with_directory_diagnostics(dir, event))
        }
        Command::SetAppCaseSharing { app, on } => {
            if !dir.apps.contains_key(app) {
                return Err(CommandError::UnknownApp(app.clone()));
            }
            let event = Event::AppCaseSharingSetV1(AppCaseSharingSetV1 {
                app_id: app.clone(),
                case_sharing: *on,
            });
            Ok(with_directory_diagnostics(dir, event))
        }
        Command::SetPassword { user, hash } => {
            if !dir.users.contains_key(user) {
                return Err(CommandError::UnknownUser(user.clone()));
            }
            check_argon2id(hash)?;
            Ok(vec![Event::UserPasswordSetV1(UserPasswordSetV1 {
                user_id: user.clone(),
                hash: hash.clone(),
            })])
        }
        Command::CreateApiKey {
            key_id,
            user,
            role,
            hash,
        } => {
            check_id("API key id", key_id.as_str())?;
            if !dir.users.contains_key(user) {
                return Err(CommandError::UnknownUser(user.clone()));
            }
            if dir.api_keys.contains_key(key_id) {
                return Err(exists("API key", key_id.as_str()));
            }
            check_argon2id(hash)?;
            Ok(vec![Event::ApiKeyCreatedV1(ApiKeyCreatedV1 {
                key_id: key_id.clone(),
                user_id: user.clone(),
                role: *role,
                hash: hash.clone(),
            })])
        }
        Command::RevokeApiKey { key_id } => match dir.api_keys.get(key_id) {
            None => Err(CommandError::UnknownApiKey(key_id.clone())),
            // Already revoked: nothing happened, nothing to record (as R86 for flags).
            Some(k) if k.revoked => Ok(Vec::new()),
            Some(_) => Ok(vec![Event::ApiKeyRevokedV1(ApiKeyRevokedV1 {
                key_id: key_id.clone(),
            })]),
        },
        Command::SubmitForm(sub) => {
            let mut events = decide_submission(state, sub, received_at)?;
            if let Some(token) = &sub.last_sync_token {
                // Recorded with the form whatever its outcome, as its base (issue 10).
                if let Some(form_id) = events.first().and_then(filed_under) {
                    events.insert(
                        1,
                        Event::FormLastSyncTokenV1(FormLastSyncTokenV1 {
                            form_id,
                            token: token.clone(),
                        }),
                    );
                }
            }
            if !sub.attachments.is_empty() {
                // I7: the files are kept whatever the outcome, right after the form's event.
                if let Some(form_id) = events.first().and_then(filed_under) {
                    events.insert(
                        1,
                        Event::FormAttachmentsV1(FormAttachmentsV1 {
                            form_id,
                            files: sub.attachments.clone(),
                        }),
                    );
                }
            }
            Ok(events)
        }
        Command::ArchiveForm { form } | Command::UnarchiveForm { form } => {
            let archive = matches!(command, Command::ArchiveForm { .. });
            let status = state
                .form(form)
                .ok_or_else(|| CommandError::UnknownForm(form.clone()))?;
            if !status.accepted {
                return Err(CommandError::FormState {
                    form: form.clone(),
                    reason: "was rejected; only accepted forms can be archived",
                });
            }
            if status.archived == archive {
                // Already in the asked state: nothing happened, nothing to record.
                return Ok(Vec::new());
            }
            let e = FormArchiveV1 {
                form_id: form.clone(),
            };
            Ok(vec![if archive {
                Event::FormArchivedV1(e)
            } else {
                Event::FormUnarchivedV1(e)
            }])
        }
    }
}

/// The form id a submission's first event filed it under.
fn filed_under(event: &Event) -> Option<FormId> {
    match event {
        Event::FormAcceptedV1(f) => Some(f.form.form_id.clone()),
        Event::FormEditedV1(f) => Some(f.form.form_id.clone()),
        Event::FormRejectedV1(f) => Some(f.form.form_id.clone()),
        Event::FormDuplicateV1(f) => Some(f.form.form_id.clone()),
        _ => None,
    }
}

fn check_id(field: &'static str, value: &str) -> Result<(), CommandError> {
    if value.trim().is_empty() {
        return Err(CommandError::Invalid {
            field,
            reason: "must not be empty".into(),
        });
    }
    if value.chars().count() > MAX_VALUE_LEN {
        return Err(CommandError::Invalid {
            field,
            reason: format!("longer than {MAX_VALUE_LEN} characters"),
        });
    }
    Ok(())
}

fn exists(kind: &'static str, id: &str) -> CommandError {
    CommandError::AlreadyExists {
        kind,
        id: id.to_owned(),
    }
}

fn diag(code: DiagnosticCode, subject: &str, detail: String) -> Event {
    Event::DiagnosticRaisedV1(DiagnosticRaisedV1 {
        diagnostic: Diagnostic {
            code,
            subject: subject.to_owned(),
            detail,
        },
    })
}

/// The directory event plus the diagnostics it causes once applied (R60, R61).
fn with_directory_diagnostics(dir: &Directory, event: Event) -> Vec<Event> {
    let mut after = dir.clone();
    after.apply(&event);
    let mut out = Vec::new();
    // R60, R86: every membership change of a user (added or removed, any group) and every
    // sharing switch of a group (on or off, for its members) after which the user is in several
    // case-sharing groups. Callers drop no-op changes before this (R86: they raise nothing).
    let touched_users: Vec<String> = match &event {
        Event::MemberAddedV1(m) | Event::MemberRemovedV1(m) => vec![m.user_id.0.clone()],
        Event::GroupCaseSharingSetV1(e) => after
            .groups
            .get(&e.group_id)
            .map(|g| g.members.iter().map(|u| u.0.clone()).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    for user in touched_users {
        let groups = after.case_sharing_groups(&user);
        if groups.len() > 1 {
            let names: Vec<&str> = groups.iter().map(|g| g.as_str()).collect();
            out.push(diag(
                DiagnosticCode::UserInMultipleCaseSharingGroups,
                &user,
                format!(
                    "user is in {} case sharing groups: {}",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
    }
    // R61: a case-sharing app while no group shares cases.
    let apps: Vec<&str> = match &event {
        Event::AppCreatedV1(e) if e.case_sharing => vec![e.app_id.as_str()],
        Event::AppCaseSharingSetV1(e) if e.case_sharing => vec![e.app_id.as_str()],
        Event::GroupCaseSharingSetV1(_) => after
            .apps
            .iter()
            .filter(|(_, a)| a.case_sharing)
            .map(|(id, _)| id.as_str())
            .collect(),
        _ => Vec::new(),
    };
    if !after.has_case_sharing_group() {
        for app in apps {
            out.push(diag(
                DiagnosticCode::CaseSharingAppWithoutGroups,
                app,
                "app has case sharing on but no group in the project has case sharing on".into(),
            ));
        }
    }
    out.insert(0, event);
    out
}

fn sha256_id(hash: &[u8; 32]) -> FormId {
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in hash {
        s.push_str(&format!("{b:02x}"));
    }
    FormId(s)
}

/// How a submission relates to what was seen before under its instanceID (R53–R56).
enum Identity {
    /// Process it under this id.
    New(FormId),
    /// An identical resend of an accepted form.
    Duplicate(FormId, Position),
    /// Same id and xmlns, different bytes, earlier copy accepted.
    Edit(FormId, Position),
}

fn identify(state: &impl State, form: &ParsedForm, hash: &[u8; 32]) -> Identity {
    let base = form.instance_id.clone();
    let mut id = base.clone();
    let mut n = 0u32;
    loop {
        match state.form(&id) {
            None => return Identity::New(id),
            // R55: a different xmlns is an id clash; file it under `<id>:<n>`.
            Some(st) if st.xmlns != form.xmlns => {
                n += 1;
                id = FormId(format!("{}:{n}", base.0));
            }
            // R56: a rejected form is decided afresh.
            Some(st) if !st.accepted => return Identity::New(id),
            Some(st) if st.content_hash == *hash => return Identity::Duplicate(id, st.position),
            Some(st) => return Identity::Edit(id, st.position),
        }
    }
}

fn decide_submission(
    state: &impl State,
    sub: &Submission,
    received_at: Timestamp,
) -> Result<Vec<Event>, CommandError> {
    let dir = state.directory();
    let app = match &sub.app {
        Some(id) => Some(
            dir.apps
                .get(id)
                .ok_or_else(|| CommandError::UnknownApp(id.clone()))?,
        ),
        None => None,
    };
    let record = |form_id: FormId, form: Option<&ParsedForm>| FormRecord {
        form_id,
        xmlns: form.map(|f| f.xmlns.clone()).unwrap_or_default(),
        app_id: sub.app.clone(),
        user_id: form.and_then(|f| f.user_id.clone()),
        content_hash: sub.content_hash,
        raw: sub.raw.clone().into(),
    };
    let reject = |form: FormRecord, code: ErrorCode, message: String, mut diags: Vec<Event>| {
        let mut out = vec![Event::FormRejectedV1(FormRejectedV1 {
            error: Rejection {
                code,
                message: message.clone(),
            },
            form: form.clone(),
        })];
        diags.push(diag(
            DiagnosticCode::RejectedSubmission,
            form.form_id.as_str(),
            format!("{code}: {message}"),
        ));
        out.extend(diags);
        out
    };

    let form = match &sub.parsed {
        Ok(form) => form,
        Err(message) => {
            let id = sha256_id(&sub.content_hash);
            return Ok(reject(
                record(id, None),
                ErrorCode::InvalidXml,
                message.clone(),
                Vec::new(),
            ));
        }
    };

    let (form_id, replaces) = match identify(state, form, &sub.content_hash) {
        Identity::New(id) => (id, None),
        Identity::Duplicate(id, original) => {
            return Ok(vec![Event::FormDuplicateV1(FormDuplicateV1 {
                form: record(id, Some(form)),
                original,
            })]);
        }
        // R54: the new version is validated like a new form; projections rebuild the cases.
        Identity::Edit(id, old) => (id, Some(old)),
    };
    let rec = record(form_id.clone(), Some(form));
    // R84, R85: an edit is judged as a form standing at the old version's place, on the cases as
    // the rebuild leaves them, and its blocks without date_modified keep the original's time.
    let (base_time, case_now) = match replaces {
        Some(_) => (
            state.original_received_at(&form_id).unwrap_or(received_at),
            Box::new(|id: &CaseId| state.case_before_form(id, &form_id))
                as Box<dyn Fn(&CaseId) -> Option<Case> + '_>,
        ),
        None => (
            received_at,
            Box::new(|id: &CaseId| state.case(id)) as Box<dyn Fn(&CaseId) -> Option<Case> + '_>,
        ),
    };

    // R52: UnknownUser right after InvalidXml.
    if let Some(user) = &form.user_id {
        if !dir.users.contains_key(&crate::UserId::new(user.as_str())) {
            return Ok(reject(
                rec,
                ErrorCode::UnknownUser,
                format!("meta/userID {user:?} is not a user of this project space"),
                Vec::new(),
            ));
        }
    }

    let sharing = app.is_some_and(|a| a.case_sharing);
    let mut diags = Vec::new();
    if let (true, Some(app_id)) = (sharing, &sub.app) {
        if let Some(user) = &form.user_id {
            let groups = dir.case_sharing_groups(user);
            if groups.is_empty() {
                diags.push(diag(
                    DiagnosticCode::UserNotInCaseSharingGroup,
                    user,
                    format!("submitted through case-sharing app {app_id} while in no case sharing group"),
                ));
            } else if groups.len() > 1 {
                let names: Vec<&str> = groups.iter().map(|g| g.as_str()).collect();
                diags.push(diag(
                    DiagnosticCode::UserInMultipleCaseSharingGroups,
                    user,
                    format!(
                        "submitted through case-sharing app {app_id} while in {}",
                        names.join(", ")
                    ),
                ));
            }
        }
        if !dir.has_case_sharing_group() {
            diags.push(diag(
                DiagnosticCode::CaseSharingAppWithoutGroups,
                app_id.as_str(),
                "a form was submitted through the app while no group has case sharing on".into(),
            ));
        }
    }

    // R50: a block naming a deleted case is an IllegalCaseId, ranked with the parse problems.
    let mut problems = form.problems.clone();
    for b in &form.blocks {
        if state.is_deleted(&b.case_id) {
            problems.push(crate::Problem {
                code: ErrorCode::IllegalCaseId,
                message: format!(
                    "case {}: the case was deleted (every form that touched it was archived or edited away)",
                    b.case_id
                ),
            });
        }
    }
    // Problems that outrank the case-sharing checks (R52).
    let first_problem = |max_rank: usize, min_rank: usize| {
        problems
            .iter()
            .filter(|p| (min_rank..max_rank).contains(&p.code.rank()))
            .min_by_key(|p| p.code.rank())
    };
    if let Some(p) = first_problem(ErrorCode::NoCaseSharingGroup.rank(), 0) {
        return Ok(reject(rec, p.code, p.message.clone(), diags));
    }
    if form.device_report {
        // R4: stored, no case processing.
        let mut out = vec![Event::FormAcceptedV1(FormAcceptedV1 {
            form: rec,
            blocks: Vec::new(),
        })];
        out.extend(diags);
        return Ok(out);
    }

    // Resolve date, user and owner of every block (R9, R37–R39).
    let mut blocks = Vec::with_capacity(form.blocks.len());
    for b in &form.blocks {
        let user = b
            .user_id
            .clone()
            .or_else(|| form.user_id.clone())
            .unwrap_or_default();
        let mut actions = b.actions.clone();
        if let Some(create) = &mut actions.create {
            if create.owner_id.is_none() && sharing {
                // R38: the submitting user's single case-sharing group owns the case.
                let submitter = form.user_id.as_deref().unwrap_or(user.as_str());
                let groups = dir.case_sharing_groups(submitter);
                match groups.as_slice() {
                    [one] => create.owner_id = Some(one.0.clone()),
                    [] => {
                        return Ok(reject(
                            rec,
                            ErrorCode::NoCaseSharingGroup,
                            format!(
                                "case {}: create without owner_id through a case-sharing app, \
                                 and user {submitter} is in no case sharing group",
                                b.case_id
                            ),
                            diags,
                        ))
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|g| g.as_str()).collect();
                        return Ok(reject(
                            rec,
                            ErrorCode::MultipleCaseSharingGroups,
                            format!(
                                "case {}: create without owner_id through a case-sharing app, \
                                 and user {submitter} is in {} case sharing groups ({})",
                                b.case_id,
                                names.len(),
                                names.join(", ")
                            ),
                            diags,
                        ));
                    }
                }
            }
        }
        blocks.push(BlockApplied {
            case_id: b.case_id.clone(),
            date: b.date_modified.unwrap_or(base_time),
            user,
            actions,
        });
    }
    if let Some(p) = first_problem(usize::MAX, ErrorCode::NoCaseSharingGroup.rank()) {
        return Ok(reject(rec, p.code, p.message.clone(), diags));
    }

    let blocks = order_blocks(blocks);

    // Dry run: apply every block to find diagnostics and the post-form state (R29).
    let mut touched: HashMap<CaseId, Option<Case>> = HashMap::new();
    let mut index_changed: Vec<CaseId> = Vec::new();
    let mut case_diags = Vec::new();
    for b in &blocks {
        let before = touched
            .entry(b.case_id.clone())
            .or_insert_with(|| case_now(&b.case_id))
            .take();
        if let Some(prev) = &before {
            // R63: a block that changes a case already closed (close-only blocks excepted).
            if prev.closed && !b.actions.is_close_only() {
                case_diags.push(diag(
                    DiagnosticCode::ClosedCaseUpdated,
                    b.case_id.as_str(),
                    format!("form {form_id} changed the case after it was closed"),
                ));
            }
            // R65: an edit dated before the current modified_on, which another user set.
            if let (Some(m), Some(by)) = (prev.modified_on, &prev.modified_on_by) {
                if b.date < m && *by != b.user {
                    case_diags.push(diag(
                        DiagnosticCode::OutOfOrderEdit,
                        b.case_id.as_str(),
                        format!(
                            "form {form_id} by {} dated {} arrived after an edit by {by} dated {m}",
                            b.user, b.date
                        ),
                    ));
                }
            }
        }
        let prev_owner = before.as_ref().map(|c| c.owner_id.clone());
        let after = apply_block(before, b, &form_id);
        // R64: owner set to an id that is neither a known user nor a known group.
        if prev_owner.as_deref() != Some(after.owner_id.as_str())
            && !dir.is_known_owner(&after.owner_id)
        {
            case_diags.push(diag(
                DiagnosticCode::OwnerUnknown,
                b.case_id.as_str(),
                format!(
                    "owner_id {:?} is neither a known user nor a known group",
                    after.owner_id
                ),
            ));
        }
        if !b.actions.index.is_empty() && !index_changed.contains(&b.case_id) {
            index_changed.push(b.case_id.clone());
        }
        touched.insert(b.case_id.clone(), Some(after));
    }

    // R29/R30: index targets checked once, after the whole form.
    for case_id in &index_changed {
        let Some(Some(case)) = touched.get(case_id) else {
            continue;
        };
        for (name, ix) in &case.indices {
            if ix.case_id == *case_id {
                return Ok(reject(
                    rec,
                    ErrorCode::InvalidCaseIndex,
                    format!("case {case_id}: index {name:?} points at the case itself"),
                    diags,
                ));
            }
            let exists = match touched.get(&ix.case_id) {
                Some(c) => c.is_some(),
                None => case_now(&ix.case_id).is_some(),
            };
            if !exists {
                return Ok(reject(
                    rec,
                    ErrorCode::InvalidCaseIndex,
                    format!(
                        "case {case_id}: index {name:?} points at case {} which does not exist",
                        ix.case_id
                    ),
                    diags,
                ));
            }
        }
    }

    // R62: a case-sharing app touching a case type its case lists do not declare.
    if let (true, Some(app), Some(app_id)) = (sharing, app, &sub.app) {
        let mut seen: Vec<&CaseId> = Vec::new();
        for b in &blocks {
            if seen.contains(&&b.case_id) {
                continue;
            }
            seen.push(&b.case_id);
            if let Some(Some(case)) = touched.get(&b.case_id) {
                if !app.case_types.contains(&case.case_type) {
                    diags.push(diag(
                        DiagnosticCode::CaseTypeMismatch,
                        app_id.as_str(),
                        format!(
                            "case {} has type {:?}, not among the app's case types [{}]",
                            case.case_id,
                            case.case_type,
                            app.case_types.join(", ")
                        ),
                    ));
                }
            }
        }
    }

    let mut out = vec![match replaces {
        Some(replaces) => Event::FormEditedV1(FormEditedV1 {
            form: rec,
            replaces,
            blocks,
        }),
        None => Event::FormAcceptedV1(FormAcceptedV1 { form: rec, blocks }),
    }];
    out.extend(diags);
    out.extend(case_diags);
    Ok(out)
}

/// R12: blocks grouped by case in first-appearance order; within one case stably sorted by the
/// smallest action key.
fn order_blocks(blocks: Vec<BlockApplied>) -> Vec<BlockApplied> {
    let mut order: Vec<CaseId> = Vec::new();
    let mut by_case: HashMap<CaseId, Vec<BlockApplied>> = HashMap::new();
    for b in blocks {
        if !by_case.contains_key(&b.case_id) {
            order.push(b.case_id.clone());
        }
        by_case.entry(b.case_id.clone()).or_default().push(b);
    }
    let mut out = Vec::new();
    for id in order {
        if let Some(mut group) = by_case.remove(&id) {
            group.sort_by_key(|b| b.actions.order_key());
            out.extend(group);
        }
    }
    out
}
