//! A message's fields: Python values to JSON and back (a `tensorferry.Proxy`
//! goes as its JSON form).

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Number, Value};

/// How deep fields may nest (a cycle or a runaway structure stops here).
const MAX_DEPTH: usize = 128;

/// The fields of a message from a dict of JSON-compatible values.
///
/// # Errors
///
/// `TypeError` naming the key of a value that is not JSON (or a key that is
/// not a string); `ValueError` for a float that JSON cannot carry (NaN,
/// infinity) or an integer outside 64 bits.
pub fn fields_from_py(fields: Option<&Bound<'_, PyAny>>) -> PyResult<Map<String, Value>> {
    let Some(fields) = fields.filter(|f| !f.is_none()) else {
        return Ok(Map::new());
    };
    let dict = fields.cast::<PyDict>().map_err(|_| {
        PyTypeError::new_err(format!(
            "fields must be a dict of JSON values, not {}",
            type_name(fields)
        ))
    })?;
    match dict_to_json(dict, "fields", 0)? {
        Value::Object(map) => Ok(map),
        _ => unreachable!("a dict converts to an object"),
    }
}

/// The name of `value`'s type, for error messages: `` `ndarray` ``.
pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map(|n| format!("`{n}`"))
        .unwrap_or_else(|_| "an object".into())
}

fn dict_to_json(dict: &Bound<'_, PyDict>, path: &str, depth: usize) -> PyResult<Value> {
    let mut map = Map::new();
    for (k, v) in dict.iter() {
        let key: String = k.cast::<PyString>().map(|s| s.to_string()).map_err(|_| {
            PyTypeError::new_err(format!(
                "{path}: keys must be strings, not {}",
                type_name(&k)
            ))
        })?;
        let here = format!("{path}[{key:?}]");
        map.insert(key, to_json(&v, &here, depth + 1)?);
    }
    Ok(Value::Object(map))
}

/// A Python value as JSON; `path` names it in errors.
pub fn to_json(value: &Bound<'_, PyAny>, path: &str, depth: usize) -> PyResult<Value> {
    if depth > MAX_DEPTH {
        return Err(PyValueError::new_err(format!(
            "{path}: nested more than {MAX_DEPTH} deep (a cycle?)"
        )));
    }
    if value.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = value.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if value.is_instance_of::<PyInt>() {
        if let Ok(i) = value.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = value.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(PyValueError::new_err(format!(
            "{path}: {value} does not fit in 64 bits"
        )));
    }
    if let Ok(f) = value.cast::<PyFloat>() {
        let f = f.value();
        return Number::from_f64(f).map(Value::Number).ok_or_else(|| {
            PyValueError::new_err(format!("{path}: {f} cannot be written as JSON"))
        });
    }
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = value.cast::<PyDict>() {
        return dict_to_json(d, path, depth);
    }
    if let Ok(l) = value.cast::<PyList>() {
        return l
            .iter()
            .enumerate()
            .map(|(i, v)| to_json(&v, &format!("{path}[{i}]"), depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    if let Ok(t) = value.cast::<PyTuple>() {
        return t
            .iter()
            .enumerate()
            .map(|(i, v)| to_json(&v, &format!("{path}[{i}]"), depth + 1))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    if let Ok(p) = value.cast::<crate::proxy::PyProxy>() {
        // A proxy travels as its JSON form, rebuilt with `Proxy.from_json`.
        return Ok(p.get().proxy().to_json());
    }
    Err(PyTypeError::new_err(format!(
        "{path}: {} is not a JSON value (None, bool, int, float, str, list, tuple, dict or tensorferry.Proxy); send arrays as tensors",
        type_name(value)
    )))
}

/// A JSON value as Python.
pub fn to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for v in items {
                list.append(to_py(py, v)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => map_to_py(py, map)?.into_any(),
    })
}

/// A JSON object as a dict.
pub fn map_to_py<'py>(py: Python<'py>, map: &Map<String, Value>) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in map {
        dict.set_item(k, to_py(py, v)?)?;
    }
    Ok(dict)
}
