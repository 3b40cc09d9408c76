//! A consumed record's headers read as bytes.
//!
//! rust-rdkafka's `Headers` API turns each header name into a `&str` and panics on a name
//! that is not UTF-8, which Kafka allows and a hostile or broken producer sends. This reads
//! them through librdkafka's C API instead, so no header can stop a partition.

use std::ffi::CStr;

use rdkafka::bindings as rdsys;
use rdkafka::message::BorrowedMessage;

/// The headers of a consumed record.
pub struct MessageHeaders<'a>(&'a BorrowedMessage<'a>);

impl<'a> MessageHeaders<'a> {
    /// The headers of `message`.
    pub fn of(message: &'a BorrowedMessage<'a>) -> Self {
        MessageHeaders(message)
    }
}

impl MessageHeaders<'_> {
    /// Calls `f` with each header's name and value (`None`: null), in order.
    pub fn visit(&self, f: &mut dyn FnMut(&[u8], Option<&[u8]>)) {
        let mut headers = std::ptr::null_mut();
        // SAFETY: the message pointer is valid while the message is borrowed, and so are
        // the headers librdkafka parses into it (owned by the message); names are
        // NUL-terminated C strings and values `size` bytes long or null.
        unsafe {
            let err = rdsys::rd_kafka_message_headers(self.0.ptr(), &mut headers);
            if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
                return;
            }
            for index in 0..rdsys::rd_kafka_header_cnt(headers) {
                let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0);
                let err = rdsys::rd_kafka_header_get_all(
                    headers, index, &mut name, &mut value, &mut size,
                );
                if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                    continue;
                }
                let name = CStr::from_ptr(name).to_bytes();
                let value = (!value.is_null())
                    .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size));
                f(name, value);
            }
        }
    }
}
