//! A small JSON Schema subset for plugin config: the keywords a config schema needs and
//! nothing that would make checking unbounded or reach outside the file.
//!
//! Supported: `type` (one name or a list), `properties`, `required`, `additionalProperties`
//! (`true`, `false` or a schema), `items`, `enum`, `minimum`, `maximum`, `minLength`,
//! `maxLength`, `minItems`, `maxItems`. Annotations (`$schema`, `title`, `description`,
//! `default`, `examples`, `$comment`) are accepted and ignored. Any other keyword is refused
//! when the manifest is read, because silently skipping a constraint (`pattern`, `$ref`,
//! `oneOf`) would let config through that the author meant to refuse.
//!
//! The full validators on crates.io resolve remote `$ref`s and pull in an HTTP client; config
//! checking needs neither, so this module keeps the host's dependency tree small.

use serde_json::{Map, Value};

/// Keywords that carry no constraint.
const ANNOTATIONS: &[&str] =
    &["$schema", "title", "description", "default", "examples", "$comment"];

/// Deepest nesting of schemas accepted, so a hostile manifest cannot exhaust the stack.
const MAX_DEPTH: usize = 32;

/// At most this many violations are reported; the first few are enough to fix a config.
const MAX_VIOLATIONS: usize = 16;

/// A checked schema, ready to validate config values.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigSchema {
    root: Value,
}

/// One way a config value breaks its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// JSON pointer of the offending value (`""` is the whole config, `/rules/0/reply` a field).
    pub pointer: String,
    /// What is wrong, in words an operator can act on.
    pub reason: String,
}

impl ConfigSchema {
    /// Checks that `schema` uses only the supported subset.
    ///
    /// # Errors
    ///
    /// A message naming the JSON pointer of the bad keyword (within the schema) and why.
    pub fn compile(schema: Value) -> Result<ConfigSchema, String> {
        check_schema(&schema, "", 0)?;
        Ok(ConfigSchema { root: schema })
    }

    /// Validates `value`; an empty list means it conforms.
    pub fn validate(&self, value: &Value) -> Vec<Violation> {
        let mut out = Vec::new();
        validate_at(&self.root, value, &mut String::new(), &mut out);
        out
    }
}

fn check_schema(schema: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: schema nested deeper than {MAX_DEPTH} levels"));
    }
    let Value::Object(map) = schema else {
        return match schema {
            Value::Bool(_) => Ok(()),
            _ => Err(format!("{}: a schema must be an object or a boolean", or_root(at))),
        };
    };

    for (key, val) in map {
        let here = format!("{at}/{key}");
        match key.as_str() {
            "type" => check_type_keyword(val, &here)?,
            "properties" => {
                let Value::Object(props) = val else {
                    return Err(format!("{here}: must be an object of schemas"));
                };
                for (name, sub) in props {
                    check_schema(sub, &format!("{here}/{name}"), depth + 1)?;
                }
            }
            "additionalProperties" | "items" => check_schema(val, &here, depth + 1)?,
            "required" => {
                let ok = val.as_array().is_some_and(|names| names.iter().all(Value::is_string));
                if !ok {
                    return Err(format!("{here}: must be a list of property names"));
                }
            }
            "enum" => {
                if val.as_array().is_none_or(|values| values.is_empty()) {
                    return Err(format!("{here}: must be a non-empty list of values"));
                }
            }
            "minimum" | "maximum" => {
                if !val.is_number() {
                    return Err(format!("{here}: must be a number"));
                }
            }
            "minLength" | "maxLength" | "minItems" | "maxItems" => {
                if !val.is_u64() {
                    return Err(format!("{here}: must be a non-negative integer"));
                }
            }
            _ if ANNOTATIONS.contains(&key.as_str()) => {}
            _ => {
                return Err(format!(
                    "{here}: keyword `{key}` is not supported; use type, properties, required, \
                     additionalProperties, items, enum, minimum, maximum, minLength, maxLength, \
                     minItems or maxItems"
                ));
            }
        }
    }
    Ok(())
}

fn check_type_keyword(val: &Value, at: &str) -> Result<(), String> {
    let known = |name: &str| {
        matches!(name, "null" | "boolean" | "object" | "array" | "number" | "integer" | "string")
    };
    let ok = match val {
        Value::String(name) => known(name),
        Value::Array(names) => {
            !names.is_empty() && names.iter().all(|n| n.as_str().is_some_and(known))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{at}: must be one of null, boolean, object, array, number, integer, string (or a \
             list of them)"
        ))
    }
}

fn or_root(pointer: &str) -> &str {
    if pointer.is_empty() { "(root)" } else { pointer }
}

fn validate_at(schema: &Value, value: &Value, at: &mut String, out: &mut Vec<Violation>) {
    if out.len() >= MAX_VIOLATIONS {
        return;
    }
    let mut fail = |reason: String| {
        if out.len() < MAX_VIOLATIONS {
            out.push(Violation { pointer: at.clone(), reason });
        }
    };
    let map = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => return fail("no value is allowed here".to_string()),
        Value::Object(map) => map,
        // compile() refused anything else.
        _ => return,
    };

    // A wrong type makes every other keyword meaningless, so it is reported alone.
    if let Some(expected) = map.get("type")
        && !type_matches(expected, value)
    {
        return fail(format!("expected {}, found {}", type_words(expected), type_name(value)));
    }
    if let Some(Value::Array(allowed)) = map.get("enum")
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        fail(format!("must be one of {}", list.join(", ")));
    }
    check_bounds(map, value, &mut fail);

    match value {
        Value::Object(fields) => validate_object(map, fields, at, out),
        Value::Array(items) => {
            if let Some(item_schema) = map.get("items") {
                for (idx, item) in items.iter().enumerate() {
                    let len = at.len();
                    at.push_str(&format!("/{idx}"));
                    validate_at(item_schema, item, at, out);
                    at.truncate(len);
                }
            }
        }
        _ => {}
    }
}

fn check_bounds(map: &Map<String, Value>, value: &Value, fail: &mut impl FnMut(String)) {
    if let Some(n) = value.as_f64() {
        if let Some(min) = map.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            fail(format!("{value} is below the minimum {min}"));
        }
        if let Some(max) = map.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            fail(format!("{value} is above the maximum {max}"));
        }
    }
    let (len, unit, min_key, max_key) = match value {
        Value::String(text) => (text.chars().count(), "characters", "minLength", "maxLength"),
        Value::Array(items) => (items.len(), "items", "minItems", "maxItems"),
        _ => return,
    };
    let len = u64::try_from(len).unwrap_or(u64::MAX);
    if let Some(min) = map.get(min_key).and_then(Value::as_u64)
        && len < min
    {
        fail(format!("has {len} {unit}; at least {min} needed"));
    }
    if let Some(max) = map.get(max_key).and_then(Value::as_u64)
        && len > max
    {
        fail(format!("has {len} {unit}; at most {max} allowed"));
    }
}

fn validate_object(
    map: &Map<String, Value>,
    fields: &Map<String, Value>,
    at: &mut String,
    out: &mut Vec<Violation>,
) {
    if let Some(Value::Array(required)) = map.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(name) && out.len() < MAX_VIOLATIONS {
                out.push(Violation {
                    pointer: format!("{at}/{name}"),
                    reason: "is required but missing".to_string(),
                });
            }
        }
    }

    let props = map.get("properties").and_then(Value::as_object);
    for (name, field) in fields {
        let len = at.len();
        at.push('/');
        at.push_str(name);
        match (props.and_then(|p| p.get(name)), map.get("additionalProperties")) {
            (Some(sub), _) => validate_at(sub, field, at, out),
            (None, Some(Value::Bool(false))) => {
                if out.len() < MAX_VIOLATIONS {
                    let known: Vec<&str> =
                        props.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    out.push(Violation {
                        pointer: at.clone(),
                        reason: format!("unknown key; known keys: {}", known.join(", ")),
                    });
                }
            }
            (None, Some(extra)) => validate_at(extra, field, at, out),
            (None, None) => {}
        }
        at.truncate(len);
    }
}

fn type_matches(expected: &Value, value: &Value) -> bool {
    match expected {
        Value::String(name) => is_type(name, value),
        Value::Array(names) => names.iter().filter_map(Value::as_str).any(|n| is_type(n, value)),
        _ => true,
    }
}

fn is_type(name: &str, value: &Value) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|n| n.fract() == 0.0)
        }
        _ => false,
    }
}

fn type_words(expected: &Value) -> String {
    match expected {
        Value::String(name) => name.clone(),
        Value::Array(names) => {
            names.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" or ")
        }
        _ => "anything".to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
