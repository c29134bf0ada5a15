//! The project's directory: users, groups, memberships and apps, as a fold over events.
//!
//! It also holds credentials as of now (password hashes, API keys), so authentication reads the
//! same fold as everything else and the log stays their only source of truth (I2).
//!
//! Small enough to keep in memory (thousands of users, not millions); `decide` reads it for owner
//! defaulting (R38) and projections read it for visibility (R44).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{ApiKey, ApiKeyId, AppId, Event, GroupId, Timestamp, UserId};

/// A mobile worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Login name.
    pub username: String,
    /// When the user was created (server received time); restore sends it as `date_joined`.
    pub created_on: Option<Timestamp>,
    /// argon2id PHC string of the user's password; `None` until one is set.
    pub password_hash: Option<String>,
}

/// A group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Display name.
    pub name: String,
    /// Case sharing on (R34).
    pub case_sharing: bool,
    /// Members.
    pub members: BTreeSet<UserId>,
}

/// An app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// Display name.
    pub name: String,
    /// Case sharing on (R6, R38).
    pub case_sharing: bool,
    /// Declared case types (R62).
    pub case_types: Vec<String>,
}

/// Users, groups and apps of one project space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Users by id.
    pub users: BTreeMap<UserId, User>,
    /// Groups by id.
    pub groups: BTreeMap<GroupId, Group>,
    /// Apps by id.
    pub apps: BTreeMap<AppId, App>,
    /// API keys by id, revoked ones included.
    pub api_keys: BTreeMap<ApiKeyId, ApiKey>,
}

impl Directory {
    /// Folds one event; events that are not about the directory are ignored.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::UserCreatedV1(e) => {
                self.users.insert(
                    e.user_id.clone(),
                    User {
                        username: e.username.clone(),
                        created_on: None,
                        password_hash: None,
                    },
                );
            }
            Event::GroupCreatedV1(e) => {
                self.groups.insert(
                    e.group_id.clone(),
                    Group {
                        name: e.name.clone(),
                        case_sharing: e.case_sharing,
                        members: BTreeSet::new(),
                    },
                );
            }
            Event::GroupCaseSharingSetV1(e) => {
                if let Some(g) = self.groups.get_mut(&e.group_id) {
                    g.case_sharing = e.case_sharing;
                }
            }
            Event::MemberAddedV1(e) => {
                if let Some(g) = self.groups.get_mut(&e.group_id) {
                    g.members.insert(e.user_id.clone());
                }
            }
            Event::MemberRemovedV1(e) => {
                if let Some(g) = self.groups.get_mut(&e.group_id) {
                    g.members.remove(&e.user_id);
                }
            }
            Event::AppCreatedV1(e) => {
                self.apps.insert(
                    e.app_id.clone(),
                    App {
                        name: e.name.clone(),
                        case_sharing: e.case_sharing,
                        case_types: e.case_types.clone(),
                    },
                );
            }
            Event::AppCaseSharingSetV1(e) => {
                if let Some(a) = self.apps.get_mut(&e.app_id) {
                    a.case_sharing = e.case_sharing;
                }
            }
            Event::UserPasswordSetV1(e) => {
                if let Some(u) = self.users.get_mut(&e.user_id) {
                    u.password_hash = Some(e.hash.clone());
                }
            }
            Event::ApiKeyCreatedV1(e) => {
                self.api_keys.insert(
                    e.key_id.clone(),
                    ApiKey {
                        user_id: e.user_id.clone(),
                        role: e.role,
                        hash: e.hash.clone(),
                        revoked: false,
                    },
                );
            }
            Event::ApiKeyRevokedV1(e) => {
                if let Some(k) = self.api_keys.get_mut(&e.key_id) {
                    k.revoked = true;
                }
            }
            _ => {}
        }
    }

    /// The user whose username (or, failing that, id) is `login`, as HTTP Basic names it.
    pub fn user_by_login(&self, login: &str) -> Option<(&UserId, &User)> {
        self.users
            .iter()
            .find(|(_, u)| u.username == login)
            .or_else(|| self.users.get_key_value(&UserId::new(login)))
    }

    /// Folds a recorded event, keeping its received time where the directory records one.
    pub fn apply_recorded(&mut self, recorded: &crate::RecordedEvent) {
        self.apply(&recorded.event);
        if let Event::UserCreatedV1(e) = &recorded.event {
            if let Some(user) = self.users.get_mut(&e.user_id) {
                user.created_on = Some(recorded.recorded_at);
            }
        }
    }

    /// The user's case-sharing groups (R34): groups with case sharing on that list the user.
    pub fn case_sharing_groups(&self, user: &str) -> Vec<&GroupId> {
        self.groups
            .iter()
            .filter(|(_, g)| g.case_sharing && g.members.iter().any(|m| m.as_str() == user))
            .map(|(id, _)| id)
            .collect()
    }

    /// The user's owner ids (R35): the user id and the ids of the user's case-sharing groups.
    pub fn owner_ids(&self, user: &str) -> Vec<String> {
        let mut ids = vec![user.to_owned()];
        ids.extend(
            self.case_sharing_groups(user)
                .into_iter()
                .map(|g| g.0.clone()),
        );
        ids
    }

    /// True when some group has case sharing on (R61).
    pub fn has_case_sharing_group(&self) -> bool {
        self.groups.values().any(|g| g.case_sharing)
    }

    /// True when `id` names a known user or group (R64).
    pub fn is_known_owner(&self, id: &str) -> bool {
        self.users.contains_key(&UserId::new(id)) || self.groups.contains_key(&GroupId::new(id))
    }
}
