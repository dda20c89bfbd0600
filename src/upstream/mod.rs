//! Everything that talks to, or stands in for, the 触站 upstream API.

pub mod sim;
