//! On a machine without a CUDA driver, opening a device fails with an error that says what to
//! do. A test binary of its own: the GPU tests load the CUDA emulator into their process, after
//! which a driver is present.

use tokenformer_core::cuda::{check_driver_present, CudaBackend};
use tokenformer_core::{Device, Tensor};

#[test]
fn opening_a_device_without_a_driver_says_what_to_do() {
    if check_driver_present().is_ok() {
        eprintln!("not applicable: a CUDA driver is present, so its absence cannot be seen");
        return;
    }
    let err = Tensor::zeros(&[2], Device::Cuda(0)).unwrap_err().to_string();
    assert!(err.contains("libcuda") && err.contains("LD_LIBRARY_PATH"), "{err}");
    let err = CudaBackend::get(0).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("libcuda"), "{err}");
}
