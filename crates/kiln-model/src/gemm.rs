//! A bounds-checked f32 matrix product over strided views, for the fused kernels.
//!
//! The `gemm` crate (the one candle's CPU matmul runs on) takes raw pointers and strides, which
//! lets a kernel multiply a head's slice of a `[tokens, heads · head_dim]` activation, or the
//! transpose of a matrix, in place. This module is the crate's only `unsafe`: every view is
//! checked against its slice before the call, so the product can never read or write out of
//! bounds.

use candle_core::Result;

/// A read-only `rows × cols` matrix inside `data`: element `(i, j)` is
/// `data[offset + i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major matrix whose rows are `row_stride` apart (a column block of a wider matrix
    /// when `row_stride > cols`).
    pub fn new(
        data: &'a [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self> {
        let m = Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        };
        check_bounds(data.len(), offset, rows, cols, row_stride, 1)?;
        Ok(m)
    }

    /// The transpose, as a view of the same memory.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// A writable `rows × cols` row-major matrix inside `data`, rows `row_stride` apart.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(
        data: &'a mut [f32],
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Result<Self> {
        check_bounds(data.len(), offset, rows, cols, row_stride, 1)?;
        Ok(Self {
            data,
            offset,
            rows,
            cols,
            row_stride,
        })
    }
}

fn check_bounds(
    len: usize,
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = offset + (rows - 1) * row_stride + (cols - 1) * col_stride;
    if last >= len {
        candle_core::bail!(
            "matrix view {rows}x{cols} (offset {offset}, strides {row_stride}/{col_stride}) \
             overruns a buffer of {len} elements"
        );
    }
    Ok(())
}

/// `dst = beta · a·b` when `accumulate` is false, `dst += beta · a·b` when it is true; single
/// threaded, for kernels that parallelise over heads instead.
pub(crate) fn matmul(
    dst: &mut MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    accumulate: bool,
) -> Result<()> {
    product(dst, a, b, beta, accumulate, gemm::Parallelism::None)
}

/// As [`matmul`], on every thread of the rayon pool: for the large products of a layer.
pub(crate) fn matmul_threaded(
    dst: &mut MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    accumulate: bool,
) -> Result<()> {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    product(dst, a, b, beta, accumulate, parallelism)
}

fn product(
    dst: &mut MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) -> Result<()> {
    if a.rows != dst.rows || b.cols != dst.cols || a.cols != b.rows {
        candle_core::bail!(
            "matmul shapes: [{}x{}] · [{}x{}] into [{}x{}]",
            a.rows,
            a.cols,
            b.rows,
            b.cols,
            dst.rows,
            dst.cols
        );
    }
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                let row = dst.offset + i * dst.row_stride;
                dst.data[row..row + n].fill(0.0);
            }
        }
        return Ok(());
    }
    let dst_ptr = dst.data[dst.offset..].as_mut_ptr();
    let a_ptr = a.data[a.offset..].as_ptr();
    let b_ptr = b.data[b.offset..].as_ptr();
    // SAFETY: every view was bounds-checked against its slice when it was built (`MatRef::new`,
    // `MatMut::new`; `t()` swaps the checked extents), the shapes agree (checked above), and
    // `dst` is a unique borrow, so it cannot alias `a` or `b`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst_ptr,
            1,
            dst.row_stride as isize,
            accumulate,
            a_ptr,
            a.col_stride as isize,
            a.row_stride as isize,
            b_ptr,
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn strided_transposed_and_accumulated_products_match_naive() -> Result<()> {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        let want = naive(&a, &b, m, k, n);

        // A column block of a wider destination, written then accumulated into.
        let mut wide = vec![9.0f32; m * 8];
        let mut dst = MatMut::new(&mut wide, 2, m, n, 8)?;
        matmul(
            &mut dst,
            MatRef::new(&a, 0, m, k, k)?,
            MatRef::new(&b, 0, k, n, n)?,
            2.0,
            false,
        )?;
        matmul(
            &mut dst,
            MatRef::new(&a, 0, m, k, k)?,
            MatRef::new(&b, 0, k, n, n)?,
            1.0,
            true,
        )?;
        for i in 0..m {
            for j in 0..n {
                assert!((wide[i * 8 + 2 + j] - 3.0 * want[i * n + j]).abs() < 1e-5);
            }
            assert_eq!(wide[i * 8], 9.0, "columns outside the view are untouched");
        }

        // bᵀ stored row-major, read through a transposed view.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut out = vec![0.0f32; m * n];
        let mut dst = MatMut::new(&mut out, 0, m, n, n)?;
        matmul(
            &mut dst,
            MatRef::new(&a, 0, m, k, k)?,
            MatRef::new(&bt, 0, n, k, k)?.t(),
            1.0,
            false,
        )?;
        for (x, y) in out.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn views_past_the_buffer_are_rejected() {
        let data = vec![0.0f32; 10];
        assert!(MatRef::new(&data, 0, 3, 4, 4).is_err());
        assert!(MatRef::new(&data, 2, 2, 4, 4).is_ok());
        let mut out = vec![0.0f32; 4];
        let mut dst = MatMut::new(&mut out, 0, 2, 2, 2).expect("fits");
        let a = MatRef::new(&data, 0, 2, 3, 3).expect("fits");
        assert!(
            matmul(&mut dst, a, a, 1.0, false).is_err(),
            "inner dimensions differ"
        );
    }
}
