//! Statements written once and bound many times. A progress update's statement has
//! about 40 values; building it with sqlx's `QueryBuilder` formats the text again for
//! every update, `$1` to `$40` included, which cost about 6 % of batchd's instructions
//! per update (callgrind). The writers of such a statement write to a [`Statement`]:
//! a `QueryBuilder` (text and values) the first time, then [`Binds`] (values only), and
//! [`fixed_text`] puts the two together. The text must not depend on the values; the
//! test below holds each fixed-text writer to that.

use std::fmt::Display;
use std::sync::OnceLock;

use sqlx::error::BoxDynError;
use sqlx::query::Query;
use sqlx::{Arguments, Database, Encode, IntoArguments, QueryBuilder, Type};

/// Where a statement's parts go: its text and its bound values.
pub(super) trait Statement<DB: Database> {
    /// SQL text.
    fn push(&mut self, sql: impl Display) -> &mut Self;

    /// A bound value, in the text as its placeholder.
    fn push_bind<'t, T: Encode<'t, DB> + Type<DB>>(&mut self, value: T) -> &mut Self;
}

impl<DB: Database> Statement<DB> for QueryBuilder<DB> {
    fn push(&mut self, sql: impl Display) -> &mut Self {
        QueryBuilder::push(self, sql)
    }

    fn push_bind<'t, T: Encode<'t, DB> + Type<DB>>(&mut self, value: T) -> &mut Self {
        QueryBuilder::push_bind(self, value)
    }
}

/// A statement's values only, for a text written before.
pub(super) struct Binds<DB: Database> {
    /// The values so far, or the first that failed to encode.
    arguments: Result<DB::Arguments, BoxDynError>,
}

impl<DB: Database> Default for Binds<DB> {
    fn default() -> Self {
        Binds {
            arguments: Ok(DB::Arguments::default()),
        }
    }
}

impl<DB: Database> Statement<DB> for Binds<DB> {
    fn push(&mut self, _sql: impl Display) -> &mut Self {
        self
    }

    fn push_bind<'t, T: Encode<'t, DB> + Type<DB>>(&mut self, value: T) -> &mut Self {
        if let Ok(arguments) = &mut self.arguments
            && let Err(error) = arguments.add(value)
        {
            self.arguments = Err(error);
        }
        self
    }
}

/// Values separated by commas, as in `(a, b, c)`.
pub(super) struct CommaSeparated<'s, S> {
    statement: &'s mut S,
    first: bool,
}

impl<'s, S> CommaSeparated<'s, S> {
    /// A list that starts at the end of `statement`.
    pub(super) fn new(statement: &'s mut S) -> Self {
        CommaSeparated {
            statement,
            first: true,
        }
    }
}

impl<DB: Database, S: Statement<DB>> Statement<DB> for CommaSeparated<'_, S> {
    fn push(&mut self, sql: impl Display) -> &mut Self {
        self.statement.push(sql);
        self
    }

    fn push_bind<'t, T: Encode<'t, DB> + Type<DB>>(&mut self, value: T) -> &mut Self {
        if !std::mem::take(&mut self.first) {
            self.statement.push(", ");
        }
        self.statement.push_bind(value);
        self
    }
}

/// The statement that `write` writes to a `QueryBuilder` and `bind` to [`Binds`] (the
/// same writer, called both ways): its text, kept in `text`, is written on the first
/// call only. A value that does not encode is the error sqlx gives for it.
pub(super) fn fixed_text<DB: Database>(
    text: &'static OnceLock<String>,
    write: impl FnOnce(&mut QueryBuilder<DB>),
    bind: impl FnOnce(&mut Binds<DB>),
) -> Result<Query<'static, DB, DB::Arguments>, sqlx::Error>
where
    DB::Arguments: IntoArguments<DB>,
{
    let text = text.get_or_init(|| {
        let mut builder = QueryBuilder::new("");
        write(&mut builder);
        builder.into_string()
    });
    let mut binds = Binds::default();
    bind(&mut binds);
    let arguments = binds.arguments.map_err(sqlx::Error::Encode)?;
    Ok(sqlx::query_with(text.as_str(), arguments))
}

#[cfg(test)]
mod tests {
    use sqlx::{Postgres, Sqlite};

    use super::*;
    use crate::domain::fixtures;
    use crate::store::stored_batch::StoredBatchV1;
    use crate::store::stored_batch::tests::every_field_set;

    /// A new batch (most fields empty) and one with every field set.
    fn batches() -> [StoredBatchV1; 2] {
        [
            StoredBatchV1::from(&fixtures::batch()),
            StoredBatchV1::from(&every_field_set()),
        ]
    }

    /// Each fixed-text writer writes one text whatever the batch, and binds as many
    /// values alone as that text has placeholders: a writer that wrote a part of its
    /// text only for some values (an optional column left out, say) would bind other
    /// values to the text written for the first batch.
    #[test]
    fn each_fixed_text_writer_writes_one_text_whatever_the_batch() {
        let [fresh, full] = batches();
        let text = |batch: &StoredBatchV1| {
            let mut sql = QueryBuilder::<Postgres>::new("");
            crate::store::postgres::write_change_with_event(&mut sql, batch);
            sql.into_string()
        };
        let postgres = text(&fresh);
        assert_eq!(postgres, text(&full));
        for batch in [&fresh, &full] {
            let mut binds = Binds::<Postgres>::default();
            crate::store::postgres::write_change_with_event(&mut binds, batch);
            assert_eq!(
                binds.arguments.unwrap().len(),
                postgres.matches('$').count()
            );
        }

        let text = |batch: &StoredBatchV1| {
            let mut sql = QueryBuilder::<Sqlite>::new("");
            crate::store::sql::push_update_if_current(&mut sql, batch);
            sql.into_string()
        };
        let sqlite = text(&fresh);
        assert_eq!(sqlite, text(&full));
        for batch in [&fresh, &full] {
            let mut binds = Binds::<Sqlite>::default();
            crate::store::sql::push_update_if_current(&mut binds, batch);
            assert_eq!(binds.arguments.unwrap().len(), sqlite.matches('?').count());
        }
    }

    /// The statement built from its fixed text carries exactly the values a builder
    /// would have bound, and a second batch gets its own values, not the first's.
    #[test]
    fn a_fixed_text_query_has_the_text_of_the_first_and_the_values_of_each() {
        static TEXT: OnceLock<String> = OnceLock::new();
        let [fresh, full] = batches();
        let query = |batch: &StoredBatchV1| {
            fixed_text::<Postgres>(
                &TEXT,
                |sql| crate::store::postgres::write_change_with_event(sql, batch),
                |binds| crate::store::postgres::write_change_with_event(binds, batch),
            )
            .unwrap()
        };
        // A query's text and its values, as text.
        fn parts(mut query: Query<'_, Postgres, sqlx::postgres::PgArguments>) -> (String, String) {
            use sqlx::Execute as _;
            let values = format!("{:?}", query.take_arguments().unwrap().unwrap());
            (query.sql().as_str().to_owned(), values)
        }
        let first = parts(query(&fresh));
        let second = parts(query(&full));
        let mut builder = QueryBuilder::<Postgres>::new("");
        crate::store::postgres::write_change_with_event(&mut builder, &full);
        let built = parts(builder.build());
        assert_eq!(second, built);
        assert_eq!(first.0, second.0);
        assert_ne!(first.1, second.1);
    }
}
