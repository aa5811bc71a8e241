//! API keys, scopes and the rules of who may do what. Which batches a caller sees is
//! decided beside the batch (`Caller::sees` in `batch.rs`).

use std::fmt;

use sha2::{Digest, Sha256};

use super::ids::random_hex;
use super::values::UnixSeconds;
use crate::error::{Error, Result};

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Create, read, list and cancel its owner's batches.
    Batches,
    /// Update any batch (the executors) and read any batch.
    Worker,
    /// Everything, on every owner's batches.
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Batches, Scope::Worker, Scope::Admin];

    /// The stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Batches => "batches",
            Scope::Worker => "worker",
            Scope::Admin => "admin",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(text: &str) -> Result<Scope> {
        Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                Error::invalid(
                    "scope",
                    format!("`{text}` is not a scope; use batches, worker or admin"),
                )
            })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An API key as stored: everything but the secret, which only its digest represents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Public id, `key_` + 96 random bits; recorded on the batches the key creates.
    pub id: String,
    /// The owner of the batches created with the key.
    pub user_id: String,
    /// What the key may do.
    pub scope: Scope,
    /// When it was created.
    pub created_at: UnixSeconds,
    /// When it was revoked; a revoked key authenticates nothing.
    pub revoked_at: Option<UnixSeconds>,
}

/// The secret a client sends as `Bearer <secret>`. Shown once at creation, never
/// stored: the store keeps only its SHA-256 digest, which is enough for a 256-bit
/// random secret (no password-style stretching is needed against guessing).
pub struct ApiKeySecret(String);

/// The prefix of every secret, so leaked keys are easy to recognise in scanners.
const SECRET_PREFIX: &str = "bd_sk_";

impl ApiKeySecret {
    /// A new secret with 256 random bits.
    pub fn generate() -> ApiKeySecret {
        ApiKeySecret(format!("{SECRET_PREFIX}{}", random_hex::<32>()))
    }

    /// The secret, to show to the operator once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The digest the store keeps.
    pub fn digest(&self) -> [u8; 32] {
        digest_of(&self.0)
    }
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKeySecret(<redacted>)")
    }
}

/// The SHA-256 digest of a presented bearer token, to look the key up by.
pub fn digest_of(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ApiKey {
    /// Checks that `text` can be an API key id (`key_` and 1 to 64 letters or digits)
    /// before it is looked up, so that no unbounded or unstorable text reaches SQL.
    pub fn check_id(text: &str) -> Result<&str> {
        let suffix = text.strip_prefix("key_").unwrap_or_default();
        if (1..=64).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Ok(text)
        } else {
            Err(Error::invalid(
                "key_id",
                format!(
                    "`{}` is not an API key id (expected `key_` followed by letters or digits)",
                    text.chars().take(80).collect::<String>()
                ),
            ))
        }
    }

    /// A new active key for `user_id`; `user_id` is validated like any identifier.
    pub fn new(user_id: &str, scope: Scope, now: UnixSeconds) -> Result<ApiKey> {
        if user_id.is_empty()
            || user_id.len() > 128
            || !user_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
        {
            return Err(Error::invalid(
                "user",
                format!("`{user_id}` is not a user id (1 to 128 letters, digits or `-_.@`)"),
            ));
        }
        Ok(ApiKey {
            id: format!("key_{}", random_hex::<12>()),
            user_id: user_id.to_owned(),
            scope,
            created_at: now,
            revoked_at: None,
        })
    }
}

/// What a caller asks to do; the scope decides whether it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// CreateBatch.
    CreateBatch,
    /// GetBatch, ListBatches.
    ReadBatches,
    /// CancelBatch.
    CancelBatch,
    /// DeleteBatch.
    DeleteBatch,
    /// UpdateBatch (workers).
    UpdateBatch,
    /// Create, read, change and delete webhook endpoints.
    ManageWebhooks,
}

impl Action {
    /// Every action, in the order `GET /v1/me` lists them.
    pub const ALL: [Action; 6] = [
        Action::CreateBatch,
        Action::ReadBatches,
        Action::CancelBatch,
        Action::DeleteBatch,
        Action::UpdateBatch,
        Action::ManageWebhooks,
    ];

    /// The action's name in `GET /v1/me`'s `permissions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateBatch => "create_batches",
            Action::ReadBatches => "read_batches",
            Action::CancelBatch => "cancel_batches",
            Action::DeleteBatch => "delete_batches",
            Action::UpdateBatch => "update_batches",
            Action::ManageWebhooks => "manage_webhooks",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Action::CreateBatch => "create batches",
            Action::ReadBatches => "read batches",
            Action::CancelBatch => "cancel batches",
            Action::DeleteBatch => "delete batches",
            Action::UpdateBatch => "update batches (worker scope needed)",
            Action::ManageWebhooks => "manage webhook endpoints (batches or admin scope needed)",
        }
    }
}

/// An authenticated caller: who they are and what their key may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The key used.
    pub key_id: String,
    /// The key's owner.
    pub user_id: String,
    /// The key's scope.
    pub scope: Scope,
}

impl Caller {
    /// The caller of an active key.
    pub fn of(key: &ApiKey) -> Caller {
        Caller {
            key_id: key.id.clone(),
            user_id: key.user_id.clone(),
            scope: key.scope,
        }
    }

    /// `PERMISSION_DENIED` unless the scope allows `action`.
    pub fn authorize(&self, action: Action) -> Result<()> {
        let allowed = match self.scope {
            Scope::Admin => true,
            Scope::Batches => action != Action::UpdateBatch,
            Scope::Worker => matches!(action, Action::ReadBatches | Action::UpdateBatch),
        };
        if allowed {
            Ok(())
        } else {
            Err(Error::PermissionDenied {
                scope: self.scope.as_str(),
                action: action.describe(),
            })
        }
    }

    /// Whether the scope allows `action`.
    pub fn may(&self, action: Action) -> bool {
        self.authorize(action).is_ok()
    }

    /// The owner to restrict listings to, `None` for every owner.
    pub fn owner_filter(&self) -> Option<&str> {
        (!self.sees_all_owners()).then_some(self.user_id.as_str())
    }

    fn sees_all_owners(&self) -> bool {
        matches!(self.scope, Scope::Worker | Scope::Admin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(scope: Scope) -> Caller {
        Caller {
            key_id: "key_1".into(),
            user_id: "alice".into(),
            scope,
        }
    }

    #[test]
    fn scopes_allow_exactly_their_actions() {
        use Action::*;
        let table = [
            (Scope::Batches, [true, true, true, false]),
            (Scope::Worker, [false, true, false, true]),
            (Scope::Admin, [true, true, true, true]),
        ];
        for (scope, allowed) in table {
            for (action, allowed) in [CreateBatch, ReadBatches, CancelBatch, UpdateBatch]
                .into_iter()
                .zip(allowed)
            {
                assert_eq!(
                    caller(scope).authorize(action).is_ok(),
                    allowed,
                    "{scope} {action:?}"
                );
            }
        }
    }

    #[test]
    fn secrets_are_long_random_and_hashed() {
        let a = ApiKeySecret::generate();
        let b = ApiKeySecret::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), SECRET_PREFIX.len() + 64);
        assert_eq!(a.digest(), digest_of(a.expose()));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn user_ids_are_validated() {
        assert!(ApiKey::new("alice@example.com", Scope::Batches, 0).is_ok());
        assert!(ApiKey::new("", Scope::Batches, 0).is_err());
        assert!(ApiKey::new("a b", Scope::Batches, 0).is_err());
    }

    #[test]
    fn key_ids_are_checked_before_a_lookup() {
        let key = ApiKey::new("alice", Scope::Batches, 0).unwrap();
        assert_eq!(ApiKey::check_id(&key.id).unwrap(), key.id);
        let too_long = format!("key_{}", "a".repeat(65));
        for bad in ["", "key_", "key_\0", "other_1", too_long.as_str()] {
            assert!(ApiKey::check_id(bad).is_err(), "{bad}");
        }
    }
}
