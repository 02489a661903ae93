//! MLflow's search grammar: `filter` (`metrics.acc > 0.9 and params.lr = '0.1' and
//! tags.team != 'x' and attributes.status = 'FINISHED'`) and `order_by`
//! (`metrics.acc DESC`). Hand-written: MLflow's grammar is its own SQL subset (MLflow parses
//! it with sqlparse plus its own rules) and no crate implements it; it is small enough that a
//! tokenizer and a loop over `<entity>.<key> <op> <value>` clauses joined by AND cover it.

use std::cmp::Ordering;

use super::TrackingError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Metric,
    Param,
    Tag,
    Attribute,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Like,
    ILike,
    In,
    NotIn,
    IsNull,
    IsNotNull,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Num(f64),
    Str(String),
    List(Vec<String>),
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Clause {
    pub entity: Entity,
    pub key: String,
    pub op: Op,
    pub value: Literal,
}

/// What a clause is compared with.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<'a> {
    Num(f64),
    Str(&'a str),
    Missing,
}

/// What search runs over: runs, experiments, models, versions.
pub trait Searchable {
    /// The attributes this kind has, with whether each is numeric.
    fn attributes() -> &'static [(&'static str, bool)];
    /// The entities other than attributes this kind has.
    fn entities() -> &'static [Entity];
    fn field(&self, entity: Entity, key: &str) -> Field<'_>;
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Num(f64),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

fn bad(msg: impl Into<String>) -> TrackingError {
    TrackingError::invalid(msg)
}

fn quoted(chars: &[char], i: &mut usize, quote: char) -> Result<String, TrackingError> {
    let mut s = String::new();
    *i += 1;
    while *i < chars.len() {
        let c = chars[*i];
        *i += 1;
        if c == quote {
            // A doubled quote is a literal quote, as in SQL.
            if chars.get(*i) == Some(&quote) {
                s.push(quote);
                *i += 1;
                continue;
            }
            return Ok(s);
        }
        s.push(c);
    }
    Err(bad(format!("Invalid search expression: unterminated {quote}-quoted string")))
}

fn tokenize(s: &str) -> Result<Vec<Tok>, TrackingError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Tok::LParen);
                i += 1;
            }
            ')' => {
                out.push(Tok::RParen);
                i += 1;
            }
            ',' => {
                out.push(Tok::Comma);
                i += 1;
            }
            '\'' | '"' => out.push(Tok::Str(quoted(&chars, &mut i, c)?)),
            '`' => out.push(Tok::Ident(quoted(&chars, &mut i, '`')?)),
            '=' => {
                out.push(Tok::Op("="));
                i += 1;
            }
            '!' | '<' | '>' => {
                let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
                let op = match two.as_str() {
                    "!=" => "!=",
                    "<>" => "!=",
                    ">=" => ">=",
                    "<=" => "<=",
                    _ if c == '<' => "<",
                    _ if c == '>' => ">",
                    _ => return Err(bad(format!("Invalid search expression: unexpected '{c}'"))),
                };
                i += if op.len() == 2 || two == "<>" { 2 } else { 1 };
                out.push(Tok::Op(op));
            }
            c if c.is_ascii_digit()
                || ((c == '-' || c == '+' || c == '.') && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit() || *d == '.')) =>
            {
                let start = i;
                i += 1;
                while i < chars.len() {
                    let d = chars[i];
                    let exp_sign = (d == '-' || d == '+') && matches!(chars[i - 1], 'e' | 'E');
                    if d.is_ascii_digit() || d == '.' || d == 'e' || d == 'E' || exp_sign {
                        i += 1;
                    } else {
                        break;
                    }
                }
                let text: String = chars[start..i].iter().collect();
                let v = text.parse::<f64>().map_err(|_| bad(format!("Invalid search expression: {text:?} is not a number")))?;
                out.push(Tok::Num(v));
            }
            c if c.is_alphanumeric() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '.' | '-' | '/' | ':')) {
                    i += 1;
                }
                let mut ident: String = chars[start..i].iter().collect();
                // `metrics."my key"` / metrics.`my key`: the key is quoted.
                if ident.ends_with('.') && i < chars.len() && matches!(chars[i], '"' | '`' | '\'') {
                    let q = chars[i];
                    ident.push_str(&quoted(&chars, &mut i, q)?);
                }
                out.push(Tok::Ident(ident));
            }
            other => return Err(bad(format!("Invalid search expression: unexpected character '{other}'"))),
        }
    }
    Ok(out)
}

fn entity_of<T: Searchable>(ident: &str) -> Result<(Entity, String), TrackingError> {
    let (prefix, key) = match ident.split_once('.') {
        Some((p, k)) => (p.to_ascii_lowercase(), k.to_string()),
        None => (String::new(), ident.to_string()),
    };
    let entity = match prefix.as_str() {
        "metric" | "metrics" => Entity::Metric,
        "param" | "params" | "parameter" | "parameters" => Entity::Param,
        "tag" | "tags" => Entity::Tag,
        "attribute" | "attributes" | "attr" | "run" => Entity::Attribute,
        "" => Entity::Attribute,
        other => return Err(bad(format!("Invalid entity type '{other}'. Valid values are metrics, params, tags, attributes"))),
    };
    if key.is_empty() {
        return Err(bad(format!("Invalid search expression: {ident:?} names no key")));
    }
    if entity == Entity::Attribute {
        if !T::attributes().iter().any(|(a, _)| *a == key) {
            let valid: Vec<&str> = T::attributes().iter().map(|(a, _)| *a).collect();
            return Err(bad(format!("Invalid attribute key '{key}' specified. Valid keys are {valid:?}")));
        }
    } else if !T::entities().contains(&entity) {
        return Err(bad(format!("Invalid entity type in {ident:?} for this search")));
    }
    Ok((entity, key))
}

fn is_numeric<T: Searchable>(entity: Entity, key: &str) -> bool {
    match entity {
        Entity::Metric => true,
        Entity::Attribute => T::attributes().iter().any(|(a, n)| *a == key && *n),
        _ => false,
    }
}

/// Parses a filter into clauses that must all hold; empty means everything.
pub fn parse_filter<T: Searchable>(filter: &str) -> Result<Vec<Clause>, TrackingError> {
    if filter.chars().count() > super::limits::MAX_FILTER_CHARS {
        return Err(bad(format!("The filter is longer than {} characters", super::limits::MAX_FILTER_CHARS)));
    }
    let toks = tokenize(filter)?;
    let mut clauses = Vec::new();
    let mut i = 0;
    let word = |t: Option<&Tok>, w: &str| matches!(t, Some(Tok::Ident(s)) if s.eq_ignore_ascii_case(w));
    while i < toks.len() {
        if !clauses.is_empty() {
            if !word(toks.get(i), "and") {
                return Err(bad("Invalid search expression: clauses must be joined with AND (OR is not supported)"));
            }
            i += 1;
        }
        let Some(Tok::Ident(ident)) = toks.get(i) else {
            return Err(bad("Invalid search expression: expected <entity>.<key> (e.g. metrics.acc)"));
        };
        let (entity, key) = entity_of::<T>(ident)?;
        i += 1;
        let op = match toks.get(i) {
            Some(Tok::Op(o)) => match *o {
                "=" => Op::Eq,
                "!=" => Op::Ne,
                ">" => Op::Gt,
                ">=" => Op::Ge,
                "<" => Op::Lt,
                _ => Op::Le,
            },
            t if word(t, "like") => Op::Like,
            t if word(t, "ilike") => Op::ILike,
            t if word(t, "in") => Op::In,
            t if word(t, "not") && word(toks.get(i + 1), "in") => {
                i += 1;
                Op::NotIn
            }
            t if word(t, "is") && word(toks.get(i + 1), "null") => {
                i += 1;
                Op::IsNull
            }
            t if word(t, "is") && word(toks.get(i + 1), "not") && word(toks.get(i + 2), "null") => {
                i += 2;
                Op::IsNotNull
            }
            _ => return Err(bad(format!("Invalid search expression: expected a comparison after {ident:?}"))),
        };
        i += 1;
        let numeric = is_numeric::<T>(entity, &key);
        let value = match op {
            Op::IsNull | Op::IsNotNull => Literal::None,
            Op::In | Op::NotIn => {
                if toks.get(i) != Some(&Tok::LParen) {
                    return Err(bad("Invalid search expression: IN takes a list: ('a', 'b')"));
                }
                i += 1;
                let mut list = Vec::new();
                loop {
                    match toks.get(i) {
                        Some(Tok::Str(s)) => list.push(s.clone()),
                        _ => return Err(bad("Invalid search expression: IN lists hold quoted strings")),
                    }
                    i += 1;
                    match toks.get(i) {
                        Some(Tok::Comma) => i += 1,
                        Some(Tok::RParen) => break,
                        _ => return Err(bad("Invalid search expression: unterminated IN list")),
                    }
                }
                i += 1;
                if numeric {
                    return Err(bad(format!("IN is not supported for numeric {key:?}")));
                }
                Literal::List(list)
            }
            _ => {
                let v = match toks.get(i) {
                    Some(Tok::Num(n)) if numeric => Literal::Num(*n),
                    Some(Tok::Str(s)) if !numeric => Literal::Str(s.clone()),
                    Some(Tok::Num(_)) => {
                        return Err(bad(format!("Invalid search expression: the value for {ident:?} must be a quoted string")))
                    }
                    Some(Tok::Str(_)) => return Err(bad(format!("Invalid search expression: the value for {ident:?} must be a number"))),
                    _ => return Err(bad(format!("Invalid search expression: expected a value after {ident:?}"))),
                };
                i += 1;
                v
            }
        };
        let ok = match op {
            Op::Gt | Op::Ge | Op::Lt | Op::Le => numeric,
            Op::Like | Op::ILike => !numeric,
            _ => true,
        };
        if !ok {
            return Err(bad(format!("Invalid comparator for {ident:?}")));
        }
        clauses.push(Clause { entity, key, op, value });
    }
    Ok(clauses)
}

/// SQL LIKE: `%` any run of characters, `_` one character.
pub fn like(text: &str, pattern: &str, fold: bool) -> bool {
    let (t, p): (Vec<char>, Vec<char>) = if fold {
        (text.to_lowercase().chars().collect(), pattern.to_lowercase().chars().collect())
    } else {
        (text.chars().collect(), pattern.chars().collect())
    };
    // Iterative matcher with backtracking to the last `%`.
    let (mut ti, mut pi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '_' || p[pi] == t[ti]) {
            ti += 1;
            pi += 1;
        } else if pi < p.len() && p[pi] == '%' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '%' {
        pi += 1;
    }
    pi == p.len()
}

impl Clause {
    pub fn matches<T: Searchable>(&self, item: &T) -> bool {
        let field = item.field(self.entity, &self.key);
        match (&self.op, &field, &self.value) {
            (Op::IsNull, f, _) => *f == Field::Missing,
            (Op::IsNotNull, f, _) => *f != Field::Missing,
            (_, Field::Missing, _) => false,
            (op, Field::Num(a), Literal::Num(b)) => match op {
                Op::Eq => a == b,
                Op::Ne => a != b,
                Op::Gt => a > b,
                Op::Ge => a >= b,
                Op::Lt => a < b,
                Op::Le => a <= b,
                _ => false,
            },
            (op, Field::Str(a), Literal::Str(b)) => match op {
                Op::Eq => a == b,
                Op::Ne => a != b,
                Op::Like => like(a, b, false),
                Op::ILike => like(a, b, true),
                _ => false,
            },
            (Op::In, Field::Str(a), Literal::List(l)) => l.iter().any(|x| x == a),
            (Op::NotIn, Field::Str(a), Literal::List(l)) => !l.iter().any(|x| x == a),
            _ => false,
        }
    }
}

/// One `order_by` term.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderBy {
    pub entity: Entity,
    pub key: String,
    pub ascending: bool,
}

pub fn parse_order_by<T: Searchable>(terms: &[String]) -> Result<Vec<OrderBy>, TrackingError> {
    let mut out = Vec::new();
    for term in terms {
        let toks = tokenize(term)?;
        let (ident, dir) = match toks.as_slice() {
            [Tok::Ident(i)] => (i, None),
            [Tok::Ident(i), Tok::Ident(d)] => (i, Some(d.to_ascii_lowercase())),
            _ => return Err(bad(format!("Invalid order_by clause '{term}'"))),
        };
        let ascending = match dir.as_deref() {
            None | Some("asc") => true,
            Some("desc") => false,
            Some(_) => return Err(bad(format!("Invalid ordering key in order_by clause '{term}'"))),
        };
        let (entity, key) = entity_of::<T>(ident)?;
        out.push(OrderBy { entity, key, ascending });
    }
    Ok(out)
}

/// Compares two items by `order`: missing values last whatever the direction, as MLflow does.
pub fn compare<T: Searchable>(a: &T, b: &T, order: &[OrderBy]) -> Ordering {
    for o in order {
        let (fa, fb) = (a.field(o.entity, &o.key), b.field(o.entity, &o.key));
        let ord = match (&fa, &fb) {
            (Field::Missing, Field::Missing) => Ordering::Equal,
            (Field::Missing, _) => return Ordering::Greater,
            (_, Field::Missing) => return Ordering::Less,
            (Field::Num(x), Field::Num(y)) => x.total_cmp(y),
            (Field::Str(x), Field::Str(y)) => x.cmp(y),
            (Field::Num(_), Field::Str(_)) => Ordering::Less,
            (Field::Str(_), Field::Num(_)) => Ordering::Greater,
        };
        let ord = if o.ascending { ord } else { ord.reverse() };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    Ordering::Equal
}

// ---- what each search runs over ----

use super::state::{Experiment, ModelVersion, RegisteredModel, Run};

impl Searchable for Run {
    fn attributes() -> &'static [(&'static str, bool)] {
        &[
            ("status", false),
            ("run_name", false),
            ("run_id", false),
            ("user_id", false),
            ("artifact_uri", false),
            ("lifecycle_stage", false),
            ("start_time", true),
            ("end_time", true),
            ("created", true),
            ("Created", true),
        ]
    }
    fn entities() -> &'static [Entity] {
        &[Entity::Metric, Entity::Param, Entity::Tag]
    }
    fn field(&self, entity: Entity, key: &str) -> Field<'_> {
        match entity {
            Entity::Metric => self.latest(key).map_or(Field::Missing, |p| Field::Num(p.value.0)),
            Entity::Param => self.params.get(key).map_or(Field::Missing, |v| Field::Str(v)),
            Entity::Tag => self.tags.get(key).map_or(Field::Missing, |v| Field::Str(v)),
            Entity::Attribute => match key {
                "status" => Field::Str(&self.status),
                "run_name" => Field::Str(&self.run_name),
                "run_id" => Field::Str(&self.run_id),
                "user_id" => Field::Str(&self.user_id),
                "artifact_uri" => Field::Str(&self.artifact_uri),
                "lifecycle_stage" => Field::Str(&self.lifecycle_stage),
                "start_time" | "created" | "Created" => Field::Num(self.start_time as f64),
                "end_time" => self.end_time.map_or(Field::Missing, |t| Field::Num(t as f64)),
                _ => Field::Missing,
            },
        }
    }
}

impl Searchable for Experiment {
    fn attributes() -> &'static [(&'static str, bool)] {
        &[("name", false), ("experiment_id", false), ("lifecycle_stage", false), ("creation_time", true), ("last_update_time", true)]
    }
    fn entities() -> &'static [Entity] {
        &[Entity::Tag]
    }
    fn field(&self, entity: Entity, key: &str) -> Field<'_> {
        match (entity, key) {
            (Entity::Tag, k) => self.tags.get(k).map_or(Field::Missing, |v| Field::Str(v)),
            (Entity::Attribute, "name") => Field::Str(&self.name),
            (Entity::Attribute, "experiment_id") => Field::Str(&self.experiment_id),
            (Entity::Attribute, "lifecycle_stage") => Field::Str(&self.lifecycle_stage),
            (Entity::Attribute, "creation_time") => Field::Num(self.creation_time as f64),
            (Entity::Attribute, "last_update_time") => Field::Num(self.last_update_time as f64),
            _ => Field::Missing,
        }
    }
}

impl Searchable for RegisteredModel {
    fn attributes() -> &'static [(&'static str, bool)] {
        &[("name", false), ("creation_timestamp", true), ("last_updated_timestamp", true), ("timestamp", true)]
    }
    fn entities() -> &'static [Entity] {
        &[Entity::Tag]
    }
    fn field(&self, entity: Entity, key: &str) -> Field<'_> {
        match (entity, key) {
            (Entity::Tag, k) => registry_tag(&self.tags, k),
            (Entity::Attribute, "name") => Field::Str(&self.name),
            (Entity::Attribute, "creation_timestamp") => Field::Num(self.creation_timestamp as f64),
            (Entity::Attribute, "last_updated_timestamp" | "timestamp") => Field::Num(self.last_updated_timestamp as f64),
            _ => Field::Missing,
        }
    }
}

/// The tag MLflow's registry marks prompts with. MLflow 3's client adds
/// ``tags.`mlflow.prompt.is_prompt` != 'true'`` to every registry search, and MLflow's server
/// treats a model without the tag as not a prompt: so does mlp.
pub const IS_PROMPT_TAG: &str = "mlflow.prompt.is_prompt";

fn registry_tag<'a>(tags: &'a std::collections::BTreeMap<String, String>, key: &str) -> Field<'a> {
    match tags.get(key) {
        Some(v) => Field::Str(v),
        None if key == IS_PROMPT_TAG => Field::Str("false"),
        None => Field::Missing,
    }
}

/// What a logged model's filter may name (mlp has no logged models yet: the filter is only
/// checked).
pub struct NoFields;

impl Searchable for NoFields {
    fn attributes() -> &'static [(&'static str, bool)] {
        &[("name", false), ("model_id", false), ("source_run_id", false), ("status", false), ("creation_timestamp", true)]
    }
    fn entities() -> &'static [Entity] {
        &[Entity::Metric, Entity::Param, Entity::Tag]
    }
    fn field(&self, _: Entity, _: &str) -> Field<'_> {
        Field::Missing
    }
}

/// A model version with its model's name, as version search sees it.
pub struct VersionOf<'a> {
    pub model: &'a RegisteredModel,
    pub version: &'a ModelVersion,
    /// `version` as text, for `version_number = '2'`.
    pub number: String,
}

impl Searchable for VersionOf<'_> {
    fn attributes() -> &'static [(&'static str, bool)] {
        &[
            ("name", false),
            ("run_id", false),
            ("source_path", false),
            ("version_number", true),
            ("creation_timestamp", true),
            ("last_updated_timestamp", true),
        ]
    }
    fn entities() -> &'static [Entity] {
        &[Entity::Tag]
    }
    fn field(&self, entity: Entity, key: &str) -> Field<'_> {
        match (entity, key) {
            (Entity::Tag, k) => registry_tag(&self.version.tags, k),
            (Entity::Attribute, "name") => Field::Str(&self.model.name),
            (Entity::Attribute, "run_id") => Field::Str(&self.version.run_id),
            (Entity::Attribute, "source_path") => Field::Str(&self.version.source),
            (Entity::Attribute, "version_number") => Field::Num(self.version.version as f64),
            (Entity::Attribute, "creation_timestamp") => Field::Num(self.version.creation_timestamp as f64),
            (Entity::Attribute, "last_updated_timestamp") => Field::Num(self.version.last_updated_timestamp as f64),
            _ => Field::Missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::state::{MetricPoint, MetricValue};
    use super::*;

    fn run(id: &str, acc: Option<f64>, lr: &str, status: &str, start: i64) -> Run {
        let mut metrics = BTreeMap::new();
        if let Some(a) = acc {
            metrics.insert("acc".to_string(), MetricPoint { value: MetricValue(a), timestamp: 1, step: 0 });
        }
        Run {
            run_id: id.into(),
            experiment_id: "0".into(),
            run_name: format!("name-{id}"),
            user_id: "u".into(),
            status: status.into(),
            start_time: start,
            end_time: None,
            artifact_uri: String::new(),
            lifecycle_stage: "active".into(),
            params: BTreeMap::from([("lr".to_string(), lr.to_string())]),
            tags: BTreeMap::from([("t".to_string(), format!("tag-{id}"))]),
            latest_metrics: metrics,
            deleted_time: None,
            legacy_metrics: BTreeMap::new(),
        }
    }

    fn select<'a>(runs: &'a [Run], filter: &str) -> Vec<&'a str> {
        let clauses = parse_filter::<Run>(filter).expect("parses");
        runs.iter().filter(|r| clauses.iter().all(|c| c.matches(*r))).map(|r| r.run_id.as_str()).collect()
    }

    #[test]
    fn tracking_filter_parses_mlflow_grammar() {
        let c = parse_filter::<Run>(
            "metrics.x > 0.5 and params.lr = '0.1' AND tags.t != 'a' and attributes.status = 'FINISHED' and metrics.`my key` <= -1e3",
        )
        .expect("parses");
        assert_eq!(c.len(), 5);
        assert_eq!(c[0], Clause { entity: Entity::Metric, key: "x".into(), op: Op::Gt, value: Literal::Num(0.5) });
        assert_eq!(c[1], Clause { entity: Entity::Param, key: "lr".into(), op: Op::Eq, value: Literal::Str("0.1".into()) });
        assert_eq!(c[2].op, Op::Ne);
        assert_eq!(c[3], Clause { entity: Entity::Attribute, key: "status".into(), op: Op::Eq, value: Literal::Str("FINISHED".into()) });
        assert_eq!(c[4], Clause { entity: Entity::Metric, key: "my key".into(), op: Op::Le, value: Literal::Num(-1000.0) });
        let c = parse_filter::<Run>("tags.\"a b\" LIKE 'x%' and run_id IN ('a', 'b') and tags.z IS NULL and params.p is not null")
            .expect("parses");
        assert_eq!(c[0].key, "a b");
        assert_eq!(c[0].op, Op::Like);
        assert_eq!(c[1].value, Literal::List(vec!["a".into(), "b".into()]));
        assert_eq!((c[2].op, c[3].op), (Op::IsNull, Op::IsNotNull));
        assert!(parse_filter::<Run>("").expect("empty").is_empty());
    }

    #[test]
    fn tracking_filter_refuses_bad_expressions() {
        for bad in [
            "metrics.x > 'a'",
            "params.lr = 0.1",
            "metrics.x > 1 or metrics.y > 2",
            "foo.x = 'a'",
            "attributes.nope = 'a'",
            "params.lr > '1'",
            "metrics.x",
            "tags.t = 'unterminated",
            "metrics.x > 1 metrics.y > 2",
            "metrics. = 1",
        ] {
            let err = parse_filter::<Run>(bad).expect_err(bad);
            assert_eq!(err.code, super::super::ErrorCode::InvalidParameterValue, "{bad}");
        }
    }

    #[test]
    fn tracking_filter_and_order_select_runs() {
        let runs = vec![
            run("a", Some(0.9), "0.1", "FINISHED", 3),
            run("b", Some(0.4), "0.1", "FINISHED", 2),
            run("c", None, "0.2", "RUNNING", 1),
            run("d", Some(0.7), "0.2", "FINISHED", 4),
        ];
        assert_eq!(select(&runs, "metrics.acc > 0.5"), vec!["a", "d"]);
        assert_eq!(select(&runs, "metrics.acc > 0.5 and params.lr = '0.1'"), vec!["a"]);
        assert_eq!(select(&runs, "attributes.status = 'RUNNING'"), vec!["c"]);
        assert_eq!(select(&runs, "tags.t != 'tag-a' and attributes.status = 'FINISHED'"), vec!["b", "d"]);
        assert_eq!(select(&runs, "tags.t LIKE 'tag-%' and params.lr ILIKE '0._'"), vec!["a", "b", "c", "d"]);
        assert_eq!(select(&runs, "attributes.start_time >= 3"), vec!["a", "d"]);
        assert_eq!(select(&runs, "metrics.acc IS NULL"), vec!["c"]);
        assert_eq!(select(&runs, "attributes.run_id NOT IN ('a','b')"), vec!["c", "d"]);

        let order = parse_order_by::<Run>(&["metrics.acc DESC".to_string()]).expect("order");
        let mut sorted: Vec<&Run> = runs.iter().collect();
        sorted.sort_by(|x, y| compare(*x, *y, &order));
        let ids: Vec<&str> = sorted.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "d", "b", "c"], "missing values last");
        let order = parse_order_by::<Run>(&["params.lr".to_string(), "attributes.start_time desc".to_string()]).expect("order");
        sorted.sort_by(|x, y| compare(*x, *y, &order));
        let ids: Vec<&str> = sorted.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "d", "c"]);
        assert!(parse_order_by::<Run>(&["metrics.acc sideways".to_string()]).is_err());
    }

    #[test]
    fn tracking_registry_search_treats_untagged_models_as_not_prompts() {
        let model = |name: &str, prompt: Option<&str>| RegisteredModel {
            name: name.into(),
            creation_timestamp: 0,
            last_updated_timestamp: 0,
            description: String::new(),
            tags: prompt.map(|p| BTreeMap::from([(IS_PROMPT_TAG.to_string(), p.to_string())])).unwrap_or_default(),
            aliases: BTreeMap::new(),
            versions: BTreeMap::new(),
            last_version: 0,
        };
        let models = [model("plain", None), model("prompt", Some("true")), model("other", None)];
        // What MLflow 3's client sends with every registry search.
        let c = parse_filter::<RegisteredModel>("name LIKE '%' AND tags.`mlflow.prompt.is_prompt` != 'true'").expect("parses");
        let names: Vec<&str> = models.iter().filter(|m| c.iter().all(|c| c.matches(*m))).map(|m| m.name.as_str()).collect();
        assert_eq!(names, vec!["plain", "other"]);
        let c = parse_filter::<RegisteredModel>("tags.other != 'x'").expect("parses");
        assert!(!c[0].matches(&models[0]), "other missing tags match nothing, as in runs");
    }

    #[test]
    fn tracking_like_matches_sql() {
        assert!(like("hello", "h%o", false));
        assert!(like("hello", "%", false));
        assert!(like("hello", "h_llo", false));
        assert!(!like("hello", "h_lo", false));
        assert!(like("HeLLo", "hello", true));
        assert!(!like("HeLLo", "hello", false));
        assert!(like("abcabc", "%abc", false));
    }
}
