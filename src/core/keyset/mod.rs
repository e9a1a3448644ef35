pub mod document;
pub mod layout;
pub mod stream;
