pub mod api_key;
pub mod cidr;
pub mod credential;
pub mod jwt;
pub mod key_record;
pub mod path;
pub mod problem;
pub mod scope;
